"""What the backend's first-call gradient check costs (`shira_fx.backend(verify="auto")`): a
Llama trained through Inductor with the check on and off, side by side in one run, each row in
a fresh process with an empty Inductor cache (neither compiles from the other's): the first
step (compile, and with the check its reference compile and two extra forward-backward runs
of each graph), the steady step after it (the check is gone by then), and the largest
gradient error the check saw.

The check holds no memory across steps: each graph's reference and compiled runs happen one
after the other inside its first call, their activations freed before it returns.

    python -m bench.verify
    python -m bench.verify --smoke    # tiny shapes, for the test suite
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import shira_fx
from bench.common import BenchParser, bench_result, describe, fmt, llama, machine, print_table, ratio, save


def _run(verify: bool, args) -> dict:
    torch._dynamo.reset()
    model = llama(args.hidden, args.layers, args.vocab, args.seq)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(r=args.r), progress=False)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    backend = shira_fx.backend(inner=args.compiler, verify=verify)
    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        t0 = time.perf_counter()
        compiled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    first = step()
    steady = statistics.median(step() for _ in range(args.steps))
    worst = max((c.relative for r in backend.reports if r.verified is not None
                 for c in r.verified.layers), default=None)
    return {"verify": verify, "first_step_s": first, "step_ms": steady * 1e3, "worst_relative_error": worst,
            "graphs_checked": sum(r.verified is not None for r in backend.reports)}


def _in_fresh_process(verify: bool, argv: list[str]) -> dict:
    """One row run by a new interpreter with an Inductor cache of its own (its last line)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        flags = list(argv)
        if "--json" in flags:  # the parent writes the results file
            del flags[flags.index("--json"):flags.index("--json") + 2]
        command = [sys.executable, "-m", "bench.verify", *flags, "--one", "on" if verify else "off"]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = BenchParser("verify", __doc__)
    p.add_shape(hidden=256, layers=4, vocab=2000, batch=4, seq=256, r=8)
    p.add_argument("--steps", type=int, default=5, help="steady steps timed after the first")
    p.add_compiler(smoke="inductor")
    p.add_argument("--one", choices=("on", "off"), default=None, help=argparse.SUPPRESS)
    args = p.parse(argv, smoke=dict(hidden=64, layers=1, vocab=64, batch=1, seq=16, steps=1))
    if args.one is not None:  # a row, in the fresh process main() started for it
        print(json.dumps(_run(args.one == "on", args)))
        return {}
    rows = [_in_fresh_process(v, argv or []) for v in (False, True)]
    off, on = rows
    for row in rows:
        row["first_vs_off"] = ratio(row["first_step_s"], off["first_step_s"])
        row["step_vs_off"] = ratio(row["step_ms"], off["step_ms"])
    info = machine()
    print_table(f"The first-call check: Llama hidden {args.hidden}, {args.layers} layers, batch "
                f"{args.batch}x{args.seq}, r={args.r}, {args.compiler}; {describe(info)}",
                ["verify", "first step s", "/ off", "steady step ms", "/ off", "graphs checked",
                 "worst relative error"],
                [["on" if r["verify"] else "off", fmt(r["first_step_s"], ".1f"), fmt(r["first_vs_off"]),
                  fmt(r["step_ms"], ".0f"), fmt(r["step_vs_off"]), r["graphs_checked"],
                  fmt(r["worst_relative_error"], ".1e")] for r in rows], align="lrrrrrr")
    print(f"\nthe check adds {on['first_step_s'] - off['first_step_s']:.1f} s to the first step")
    return save(args, bench_result("verify", info, args, rows=rows))


if __name__ == "__main__":
    main()
