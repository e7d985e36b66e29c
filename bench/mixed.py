"""Many adapters in one batch, side by side in one run: shira_fx `bank.per_request(names)` (one
forward for the whole mixed batch, each row with its own adapter; eager and compiled), PEFT
LoRA's mixed-batch inference (`adapter_names=[...]`) and fused switching one adapter at a time
(shira_fx `bank.activate`; PEFT `set_adapter` + `merge_adapter`, run the adapter's rows,
`unmerge_adapter`), against the base model without any adapter.

A Llama built from a config (random weights), inference under `torch.no_grad`, 16 adapters
loaded (all 7 decoder linears; SHiRA with LoRA r's budget r*(out+in) per weight, so the
trainable counts are equal); the batch's rows are assigned to 1, 4 or 16 distinct adapters
round-robin. Throughput is tokens/s of the whole batch (for switching: all groups together,
activations included), relative to the base model of the same mode. The timed calls of all
rows run interleaved in rounds (a shared machine's noise hits every row alike); medians.

Correctness, once per distinct-adapter count: each per_request row against the same row
computed with its adapter activated alone (max abs diff of the logits, must be < 1e-4), and
PEFT's mixed batch against PEFT's own merged adapter. Where per_request's time goes (the
table packing on entering the block, the side op, the rest) comes from one profiled call.

Threads: two mixed batches (and a mixed batch beside a request for the active adapter) run
once one after the other and once in two threads started together; the ratio shows they run
at the same time (the bank's gate lets them both in). Use `--threads 1` to leave each its core.

    python -m bench.mixed                       # hidden 256, 4 layers, batch 32x128, + inductor
    python -m bench.mixed --compiler none       # eager rows only
    python -m bench.mixed --threads 1           # one thread: steadier on a shared machine
    python -m bench.mixed --smoke               # tiny shapes, eager, for the test suite
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import peft
import torch

import shira_fx
from bench.common import (
    BenchParser,
    bench_result,
    describe,
    fmt,
    llama,
    machine,
    print_table,
    ratio,
    recompile_limit,
    save,
    torch_threads,
    verdict,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE = "base model (no adapter)"
OURS = "shira_fx per_request"
LORA = "PEFT LoRA mixed batch (adapter_names)"
OURS_SWITCH = "shira_fx fused switching (activate per group)"
LORA_SWITCH = "PEFT LoRA fused switching (merge/unmerge per group)"
TOLERANCE = 1e-4


@dataclass
class Row:
    """One timed variant: what it runs, and the times of its calls."""

    method: str
    mode: str
    distinct: int | None  # None: the base model, the same for every count
    fn: Callable[[], object]
    times: list[float] = field(default_factory=list)
    warmup_s: float = 0.0

    def timed(self, n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            self.fn()
            self.times.append(time.perf_counter() - t0)


def build(args):
    return llama(args.hidden, args.layers, args.vocab, args.seq).eval()


def names_for(k: int, batch: int) -> list[str]:
    """Round-robin: row i uses adapter a{i % k}."""
    return [f"a{i % k}" for i in range(batch)]


def groups_for(names: list[str]) -> dict[str, torch.Tensor]:
    """Each distinct adapter's rows, in order of first appearance."""
    out: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        out.setdefault(n, []).append(i)
    return {n: torch.tensor(rows) for n, rows in out.items()}


def shira_adapters(args, folder: str) -> tuple[list[str], int]:
    """`args.adapters` SHiRA adapters (masks seeded 0..n-1, random values standing for trained
    ones), saved; returns their paths and the trainable count of one."""
    model = build(args)
    g = torch.Generator().manual_seed(1234)
    paths, nnz = [], 0
    for i in range(args.adapters):
        adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(r=args.r, target_modules=TARGETS, seed=i),
                                   progress=False)
        with torch.no_grad():
            for layer in adapter.layers.values():
                layer.values.copy_(torch.randn(layer.values.shape, generator=g) * args.scale)
        nnz = adapter.num_trainable()
        paths.append(os.path.join(folder, f"a{i}.safetensors"))
        adapter.save(paths[-1])
        adapter.remove()
    return paths, nnz


def lora_model(args) -> peft.PeftModel:
    """`args.adapters` LoRA adapters with random A and B (init_lora_weights=False), so none is
    a no-op; eval mode (PEFT refuses adapter_names while training)."""
    torch.manual_seed(4321)
    make = lambda: peft.LoraConfig(r=args.r, lora_alpha=args.r, target_modules=TARGETS,
                                   init_lora_weights=False)
    pm = peft.get_peft_model(build(args), make(), adapter_name="a0")
    for i in range(1, args.adapters):
        pm.add_adapter(f"a{i}", make())
    with torch.no_grad():  # B at the SHiRA values' scale: deltas of a comparable size
        for m in pm.modules():
            if isinstance(m, peft.tuners.lora.LoraLayer):
                for b in m.lora_B.values():
                    b.weight.mul_(args.scale)
    return pm.eval()


def lora_trainable(pm: peft.PeftModel) -> int:
    return sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n and ".a0." in n)


@torch.no_grad()
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def where_time_goes(bank, names, ids) -> dict:
    """One profiled eager per_request call, in ms (inclusive times, the profiler's overhead
    included): the whole call, entering the block (packing every layer's table), the forward,
    the mixed-batch ops (on CPU shira_fx::request_linear, the whole linear per adapter; else
    shira_fx::side_segmented beside the base) and the aten ops they are made of: the dense
    products (a Llama's linears have no bias: aten::mm), the weight copies an adapter's rows
    run on (aten::clone + aten::index_add_) and the sparse side products (aten::addmm, CSR)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("mixed::call"):
            ctx = bank.per_request(names)
            with record_function("mixed::enter"):
                model = ctx.__enter__()
            try:
                with record_function("mixed::forward"):
                    model(input_ids=ids)
            finally:
                ctx.__exit__(None, None, None)
    events = prof.key_averages()
    total = {e.key: e.cpu_time_total / 1e3 for e in events}
    calls = {e.key: e.count for e in events}
    ops = ("shira_fx::request_linear", "shira_fx::side_segmented")
    mixed_ms = sum(total.get(op, 0.0) for op in ops)
    return {"call_ms": total.get("mixed::call"), "enter_ms": total.get("mixed::enter"),
            "forward_ms": total.get("mixed::forward"), "side_op_ms": mixed_ms,
            "side_op_calls": sum(calls.get(op, 0) for op in ops),
            "side_op_share_of_forward": ratio(mixed_ms, total.get("mixed::forward")),
            "base_dense_mm_ms": total.get("aten::mm", 0.0),
            "weight_copy_ms": total.get("aten::clone", 0.0) + total.get("aten::index_add_", 0.0),
            "side_csr_addmm_ms": total.get("aten::addmm", 0.0),
            "top_ops_ms": dict(sorted(((k, v) for k, v in total.items() if k.startswith("aten::")),
                                      key=lambda kv: -kv[1])[:12])}


def side_by_side(fns: list[Callable[[], object]], calls: int) -> tuple[float, float]:
    """Median seconds to run every fn once: one after the other in this thread, and each in a
    thread of its own started together (each under no_grad: it is per thread)."""
    serial, together = [], []

    def run(fn, start):
        start.wait()
        with torch.no_grad():
            fn()

    for _ in range(calls):
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        serial.append(time.perf_counter() - t0)
        start = threading.Barrier(len(fns) + 1)
        threads = [threading.Thread(target=run, args=(fn, start)) for fn in fns]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        together.append(time.perf_counter() - t0)
    return statistics.median(serial), statistics.median(together)


def measure(args) -> dict:
    folder = tempfile.mkdtemp(prefix="shira_mixed_")
    paths, nnz = shira_adapters(args, folder)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    base = build(args)
    mixed_bank = shira_fx.AdapterBank(build(args))  # per_request only: nothing is ever activated
    switch_bank = shira_fx.AdapterBank(build(args))  # fused switching
    for i, path in enumerate(paths):
        mixed_bank.load(f"a{i}", path)
        switch_bank.load(f"a{i}", path)
    pm = lora_model(args)
    modes = ["eager"] + ([] if args.compiler == "none" else ["compiled"])
    compiled_base = compiled_mixed = None
    if "compiled" in modes:
        compiled_base = torch.compile(base, backend=args.compiler)
        compiled_mixed = torch.compile(mixed_bank.model, backend=shira_fx.backend(inner=args.compiler))

    def per_request(model_fn, names):
        def run():
            with mixed_bank.per_request(names) as model:
                return (model if model_fn is None else model_fn)(input_ids=ids).logits
        return run

    def shira_switch(groups, subs):
        def run():
            return {a: (switch_bank.activate(a), switch_bank.model(input_ids=subs[a]).logits)[1]
                    for a in groups}
        return run

    def lora_switch(groups, subs):
        def run():
            out = {}
            for a in groups:
                pm.set_adapter(a)
                pm.merge_adapter()
                out[a] = pm(input_ids=subs[a]).logits
                pm.unmerge_adapter()
            return out
        return run

    rows = [Row(BASE, "eager", None, lambda: base(input_ids=ids).logits)]
    if compiled_base is not None:
        rows.append(Row(BASE, "compiled", None, lambda: compiled_base(input_ids=ids).logits))
    checks, breakdown = [], {}
    for k in args.distinct:
        names = names_for(k, args.batch)
        groups = groups_for(names)
        subs = {a: ids[r] for a, r in groups.items()}
        rows.append(Row(OURS, "eager", k, per_request(None, names)))
        if compiled_mixed is not None:
            rows.append(Row(OURS, "compiled", k, per_request(compiled_mixed, names)))
        rows.append(Row(LORA, "eager", k, lambda names=names: pm(input_ids=ids, adapter_names=names).logits))
        rows.append(Row(OURS_SWITCH, "eager", k, shira_switch(groups, subs)))
        rows.append(Row(LORA_SWITCH, "eager", k, lora_switch(groups, subs)))

    with torch.no_grad():
        for r in rows:  # warm-up (compilation)
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                r.fn()
            r.warmup_s = time.perf_counter() - t0
            print(f"  {r.method} ({r.mode}, {r.distinct or '-'}): warm-up {r.warmup_s:.1f} s",
                  file=sys.stderr)

        for k in args.distinct:  # correctness, once per distinct-adapter count
            names = names_for(k, args.batch)
            groups = groups_for(names)
            subs = {a: ids[r] for a, r in groups.items()}
            want = torch.empty(args.batch, args.seq, args.vocab)
            for a, out in shira_switch(groups, subs)().items():
                want[groups[a]] = out
            switch_bank.deactivate()
            check = {"distinct": k}
            for mode, fn in (("eager", None), ("compiled", compiled_mixed)):
                if mode in modes:
                    got = per_request(fn, names)()
                    check[f"per_request_{mode}_max_abs_diff"] = max_diff(got, want)
            lora_want = torch.empty_like(want)
            for a, out in lora_switch(groups, subs)().items():
                lora_want[groups[a]] = out
            check["peft_mixed_vs_merged_max_abs_diff"] = max_diff(
                pm(input_ids=ids, adapter_names=names).logits, lora_want)
            plain = base(input_ids=ids).logits
            check["adapters_change_output"] = max_diff(want, plain) > TOLERANCE
            check["lora_adapters_change_output"] = max_diff(lora_want, plain) > TOLERANCE
            check["pass"] = check["adapters_change_output"] and all(
                v < TOLERANCE for key, v in check.items() if key.startswith("per_request_"))
            checks.append(check)
            breakdown[str(k)] = where_time_goes(mixed_bank, names, ids)

        frames = sum(torch._dynamo.utils.counters["frames"].values())
        rounds = max(1, min(args.rounds, args.calls))
        for i in range(rounds):
            for r in rows:
                r.timed(args.calls // rounds + (i < args.calls % rounds))
        recompiled = sum(torch._dynamo.utils.counters["frames"].values()) - frames

        # threads: mixed batches are readers of the bank's gate, so they run at the same time
        # as each other and as a request for the active adapter (here the base: none active)
        k = max(args.distinct)
        names = names_for(k, args.batch)
        other = names[1:] + names[:1]

        def request(model_fn):
            def run():
                with mixed_bank.using(None) as model:
                    return (model if model_fn is None else model_fn)(input_ids=ids).logits
            return run

        threads = []
        for mode, fn in (("eager", None), ("compiled", compiled_mixed)):
            if mode not in modes:
                continue
            for pair, fns in (("2 mixed batches", [per_request(fn, names), per_request(fn, other)]),
                              ("mixed batch + request for the active adapter",
                               [per_request(fn, names), request(fn)])):
                serial, together = side_by_side(fns, args.calls)
                threads.append({"pair": pair, "mode": mode, "distinct": k, "serial_ms": serial * 1e3,
                                "threads_ms": together * 1e3, "speedup": ratio(serial, together)})
    if recompiled:
        print(f"  warning: {recompiled} frames compiled during the timed calls", file=sys.stderr)
    tokens = args.batch * args.seq
    base_ms = {r.mode: statistics.median(r.times) * 1e3 for r in rows if r.method == BASE}
    out = []
    for r in rows:
        ms = statistics.median(r.times) * 1e3
        out.append({"method": r.method, "mode": r.mode, "distinct": r.distinct, "ms": ms,
                    "ms_min": min(r.times) * 1e3, "ms_all": [t * 1e3 for t in r.times],
                    "tokens_per_s": tokens / (ms / 1e3), "vs_base": ratio(base_ms[r.mode], ms),
                    "warmup_s": r.warmup_s})
    lora_count = lora_trainable(pm)
    return {"rows": out, "checks": checks, "breakdown": breakdown, "threads": threads, "trainable_shira": nnz,
            "trainable_lora": lora_count, "frames_compiled_while_timing": recompiled}


def targets(rows: list[dict], k: int) -> list[dict]:
    """The issue's targets at `k` distinct adapters, for each mode per_request ran in."""
    got = {(r["method"], r["mode"], r["distinct"]): r for r in rows}
    lora = got.get((LORA, "eager", k))
    out = []
    for mode in ("eager", "compiled"):
        ours = got.get((OURS, mode, k))
        if ours is None:
            continue
        vs_lora = ratio(ours["tokens_per_s"], lora and lora["tokens_per_s"])
        for what, value, limit in ((f"vs the base model ({mode})", ours["vs_base"], 0.8),
                                   ("vs PEFT LoRA mixed batch (eager)", vs_lora, 1.0),
                                   ("vs PEFT LoRA mixed batch (eager), goal", vs_lora, 1.2)):
            out.append({"target": f"shira_fx per_request {mode}, {k} adapters, throughput {what}",
                        "value": value, "limit": limit, "pass": None if value is None else value >= limit})
    return out


def report(result: dict, args) -> None:
    info = result["machine"]
    caption = (f"Llama hidden {args.hidden}, intermediate {args.hidden * 11 // 4}, {args.layers} layers, "
               f"vocab {args.vocab}, batch {args.batch}x{args.seq} ({args.batch * args.seq} tokens), "
               f"inference (no_grad), fp32; {args.adapters} adapters loaded, all 7 linears, SHiRA at LoRA "
               f"r={args.r}'s budget ({result['trainable_shira']:,} values/adapter; LoRA "
               f"{result['trainable_lora']:,}); rows round-robin over the distinct adapters; compiled = "
               f"{'-' if args.compiler == 'none' else args.compiler}; {describe(info)}")
    table = []
    for r in result["rows"]:
        table.append([r["method"], r["mode"], "-" if r["distinct"] is None else r["distinct"],
                      fmt(r["ms"], ".0f"), fmt(r["tokens_per_s"], ",.0f"), fmt(r["vs_base"], ".2f", "x")])
    print_table(caption, ["method", "mode", "distinct adapters", "ms / batch", "tokens/s", "vs base"],
                table, align="llrrrr")
    print()
    for c in result["checks"]:
        diffs = ", ".join(f"{k.removesuffix('_max_abs_diff')} {v:.2e}" for k, v in c.items()
                          if k.endswith("_max_abs_diff"))
        print(f"{verdict(c['pass'])}: correctness, {c['distinct']} adapters: max |logit diff| "
              f"{diffs} (per_request < {TOLERANCE:g})")
    for k, b in result["breakdown"].items():
        print(f"per_request eager, {k} adapters, one profiled call: {fmt(b['call_ms'], '.0f')} ms = "
              f"entering (table packing) {fmt(b['enter_ms'], '.0f')} "
              f"+ forward {fmt(b['forward_ms'], '.0f')}; "
              f"mixed-batch ops {fmt(b['side_op_ms'], '.0f')} ms in {b['side_op_calls']} calls "
              f"({fmt(b['side_op_share_of_forward'], '.0%')} of the forward): dense products "
              f"{fmt(b['base_dense_mm_ms'], '.0f')} ms, "
              f"weight copies {fmt(b.get('weight_copy_ms'), '.0f')} ms, "
              f"sparse side products {fmt(b['side_csr_addmm_ms'], '.0f')} ms")
    print()
    for t in result["threads"]:
        print(f"threads ({t['mode']}, {t['distinct']} adapters, {result['machine']['threads']} "
              f"torch threads): {t['pair']}: {fmt(t['serial_ms'], '.0f')} ms one after the other, "
              f"{fmt(t['threads_ms'], '.0f')} ms in two threads at once ({fmt(t['speedup'], '.2f', 'x')})")
    print()
    for t in result["targets"]:
        print(f"{verdict(t['pass'])}: {t['target']}: {fmt(t['value'], '.3f')}x (target >= {t['limit']})")


def main(argv: list[str] | None = None) -> dict:
    p = BenchParser("mixed", __doc__, smoke="tiny shapes, eager only, for the test suite")
    p.add_shape(hidden=256, layers=4, vocab=2000, batch=32, seq=128)
    p.add_argument("--adapters", type=int, default=16, help="adapters loaded")
    p.add_argument("--distinct", default="1,4,16", help="distinct adapters per batch (comma-separated)")
    p.add_shape(r=8)
    p.add_argument("--scale", type=float, default=0.01, help="std of the random adapter values")
    p.add_argument("--calls", type=int, default=6, help="timed calls per row")
    p.add_argument("--rounds", type=int, default=3, help="the timed calls of all rows interleave in rounds")
    p.add_argument("--warmup", type=int, default=1)
    p.add_compiler(default="inductor", smoke="none",
                   help="inner compiler of the compiled rows, or 'none' for eager rows only")
    p.add_threads("torch threads (default torch's); on a shared machine 1 avoids OpenMP barrier "
                  "stalls, which hit every parallel op, so the mixed paths' many small ops most")
    args = p.parse(argv, smoke=dict(hidden=64, layers=1, vocab=64, batch=8, seq=8, adapters=4, distinct="1,4",
                                    calls=2, rounds=2, warmup=1, compiler="none"))
    args.distinct = [int(k) for k in str(args.distinct).split(",")]
    if max(args.distinct) > args.adapters:
        p.error(f"--distinct {max(args.distinct)} exceeds --adapters {args.adapters}")
    recompile_limit(64)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t_start = time.perf_counter()
    with torch_threads(args.threads):
        info = machine()
        measured = measure(args)
    k = max(args.distinct)
    result = bench_result("mixed", info, args, **measured, targets=targets(measured["rows"], k),
                          seconds=time.perf_counter() - t_start)
    report(result, args)
    return save(args, result)


if __name__ == "__main__":
    main()
