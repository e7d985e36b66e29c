"""Training beyond one process, side by side in one run: DDP and FSDP2 (torch's own engines),
each with full fine-tuning, PEFT LoRA and shira_fx at LoRA's trainable count, on a Llama built
from a config (no download), every row compiled (shira_fx through its backend).

Per row, measured on every rank and reported for rank 0 (step time: the slowest rank): the
bytes each collective carried in one step, split into gradients (all-reduce, reduce-scatter)
and parameters (FSDP2's all-gathers), counted at the dispatcher (a dispatch mode sees the
c10d ops DDP's reducer and FSDP2 issue; it runs that one step eagerly, with the same
collectives); what stays resident on a rank (local weight shards, buffers, adapter tensors,
optimizer state); the median step time; and, for shira_fx, that every rank holds the same
values. Prints a markdown table and writes JSON.

    python -m bench.distributed                          # 2 CPU processes (gloo) under torchrun
    torchrun --nproc-per-node 2 -m bench.distributed     # the same, launched by hand; nccl on CUDA
    python -m bench.distributed --smoke                  # tiny shapes, aot_eager, 1 step

Without torchrun's environment the module relaunches itself with
`python -m torch.distributed.run --standalone --nproc-per-node N -m bench.distributed` (the
repository root on the ranks' PYTHONPATH) and waits for it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import peft
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import shira_fx
import shira_fx.distributed
from bench.common import (
    REPO,
    BenchParser,
    bench_result,
    describe,
    fmt,
    llama,
    machine,
    print_table,
    recompile_limit,
    save,
    unique_bytes,
    write_json,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = [(e, m) for e in ("DDP", "FSDP2") for m in ("full fine-tuning", "PEFT LoRA", "shira_fx")]
GRADIENT_OPS = {"allreduce_", "reduce_scatter_", "_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_"}
GATHER_OPS = {"allgather_", "_allgather_base_", "allgather_into_tensor_coalesced_"}
MiB = 2**20


class CollectiveBytes(TorchDispatchMode):
    """Adds up, per collective, the size of the largest tensor it is handed (the full buffer:
    the reduced tensor, the gathered output, the scattered input), i.e. what one rank's share
    of the traffic is proportional to."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            sizes = [t.numel() * t.element_size() for t in tree_leaves((args, kwargs))
                     if isinstance(t, torch.Tensor)]
            name = func._opname
            self.bytes[name] = self.bytes.get(name, 0) + max(sizes, default=0)
        return func(*args, **(kwargs or {}))

    def total(self, ops: set[str]) -> int:
        return sum(n for op, n in self.bytes.items() if op in ops)


class Row:
    """One engine x method: the wrapped, compiled model, its optimizer and its step."""

    def __init__(self, engine: str, method: str, args):
        self.engine, self.method, self.args = engine, method, args
        model = llama(args.hidden, args.layers, args.vocab, args.seq, args.device)
        self.adapter, extra = None, []
        backend = args.compiler
        if method == "full fine-tuning":
            params = list(model.parameters())
        elif method == "PEFT LoRA":
            model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                               target_modules=TARGETS))
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            cfg = shira_fx.ShiraConfig(target_modules=TARGETS, r=args.r)
            self.adapter = shira_fx.prepare(model, cfg, progress=False)
            params = list(self.adapter.parameters())
            extra = [t for la in self.adapter.layers.values() for t in (la.indices, la.base)]
            backend = shira_fx.backend(inner=args.compiler)
        self.trainable = sum(p.numel() for p in params)
        blocks = list((model.get_base_model() if method == "PEFT LoRA" else model).model.layers)
        if engine == "DDP":
            net = nn.parallel.DistributedDataParallel(model)
        elif self.adapter is not None:
            net = shira_fx.distributed.fully_shard(model, self.adapter, modules=blocks)
        else:
            from torch.distributed.fsdp import fully_shard

            for block in blocks:
                fully_shard(block)
            net = fully_shard(model)
            params = [p for p in model.parameters() if p.requires_grad]  # now DTensors
        self.model, self.extra = model, extra
        self.backend = backend
        self.run = torch.compile(net, backend=backend)
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        if self.adapter is not None:
            self.adapter.check_optimizer(self.opt)
        self.times: list[float] = []

    def step(self, batch: dict) -> float:
        loss = self.run(**batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def timed(self, batch: dict) -> None:
        dist.barrier()
        t0 = time.perf_counter()
        self.loss = self.step(batch)
        if self.args.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t0)

    def resident_bytes(self) -> int:
        opt_state = [t for s in self.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return unique_bytes([*self.model.parameters(), *self.model.buffers(), *opt_state, *self.extra])

    def rewritten_layers(self) -> int | None:
        """How many prepared layers the backend's pass rewrote (None for the other methods)."""
        if self.adapter is None:
            return None
        return len({name for report in self.backend.reports for name in report.rewritten})

    def same_values_on_every_rank(self) -> bool | None:
        if self.adapter is None:
            return None
        mine = torch.cat([p.detach().reshape(-1) for p in self.adapter.parameters()])
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        return all(torch.equal(mine, other) for other in everyone)


def share(args, seed: int) -> dict:
    """This rank's slice of a global batch (the same global batch on every rank)."""
    ids = torch.randint(0, args.vocab, (args.batch * dist.get_world_size(), args.seq),
                        generator=torch.Generator().manual_seed(seed))
    ids = ids.chunk(dist.get_world_size())[dist.get_rank()].to(args.device)
    return {"input_ids": ids, "labels": ids}


def slowest(x: float, device: str) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def worker(args) -> dict | None:
    """Every rank runs this; rank 0 returns the result."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        args.device = f"cuda:{torch.cuda.current_device()}"

    def say(line: str) -> None:
        if rank == 0:
            print(line, file=sys.stderr, flush=True)

    def frames() -> int:
        return sum(torch._dynamo.utils.counters["frames"].values())

    wanted = [r for r in ROWS if not args.rows or f"{r[0]} {r[1]}" in args.rows.split(",")]
    runners, out = [], []
    for engine, method in wanted:
        t0 = time.perf_counter()
        r = Row(engine, method, args)
        for i in range(args.warmup):
            r.step(share(args, i))
        runners.append(r)
        out.append({"engine": engine, "method": method, "trainable": r.trainable,
                    "resident_MiB": r.resident_bytes() / MiB,
                    "warmup_s": slowest(time.perf_counter() - t0, args.device)})
        say(f"  {engine} {method}: warm-up {out[-1]['warmup_s']:.0f} s")
    for _ in range(4):  # settle: a later row's compile may have displaced an earlier row's code
        before = frames()
        for r in runners:
            r.step(share(args, 0))
        if slowest(frames() - before, args.device) == 0:
            break
    before = frames()
    for i in range(args.steps):  # interleaved: one step of every row at a time
        for r in runners:
            r.timed(share(args, 1000 + i))
    recompiled = int(slowest(frames() - before, args.device))
    if recompiled:
        say(f"  warning: {recompiled} frames compiled during the timed steps")
    # last, since a dispatch mode makes Dynamo run the step eagerly (the collectives are the same)
    for row, r in zip(out, runners, strict=True):
        counter = CollectiveBytes()
        with counter:
            r.step(share(args, 2000))
        row.update(step_ms=slowest(statistics.median(r.times), args.device) * 1e3, loss=r.loss,
                   gradient_MiB_per_step=counter.total(GRADIENT_OPS) / MiB,
                   gathered_MiB_per_step=counter.total(GATHER_OPS) / MiB, collectives=counter.bytes,
                   same_values_on_every_rank=r.same_values_on_every_rank(),
                   rewritten_layers=r.rewritten_layers(),
                   frames_compiled_while_timing=recompiled)
        say(f"  {row['engine']} {row['method']}: {row['step_ms']:.0f} ms/step, "
            f"gradients {row['gradient_MiB_per_step']:.3f} MiB/step")
    if rank != 0:
        return None
    return bench_result("distributed", machine(args.device), args, world=world, backend=dist.get_backend(),
                        rows=out)


def ratios(rows: list[dict]) -> None:
    """Gradient traffic and resident bytes against full fine-tuning and PEFT LoRA of the same
    engine."""
    for r in rows:
        for base, key in (("full fine-tuning", "vs_full"), ("PEFT LoRA", "vs_lora")):
            ref = next((x for x in rows if x["engine"] == r["engine"] and x["method"] == base), None)
            for what in ("gradient_MiB_per_step", "resident_MiB", "step_ms"):
                den = None if ref is None else ref[what]
                r[f"{what}_{key}"] = r[what] / den if den else None


def report(result: dict) -> None:
    a = result["args"]
    caption = (f"Llama hidden {a['hidden']}, {a['layers']} layers, vocab {a['vocab']}; "
               f"{result['world']} ranks ({result['backend']}), batch {a['batch']}x{a['seq']} per rank, "
               f"r={a['r']} (shira_fx at LoRA's count), torch.compile({a['compiler']}); "
               f"{describe(result['machine'])} per rank")
    headers = ["engine", "method", "trainable", "gradient MiB/step", "/ full", "/ LoRA",
               "gathered MiB/step", "resident MiB/rank", "step ms", "/ LoRA", "ranks agree"]
    table = [[r["engine"], r["method"], f"{r['trainable']:,}", fmt(r["gradient_MiB_per_step"], ".2f"),
              fmt(r["gradient_MiB_per_step_vs_full"], ".3f"), fmt(r["gradient_MiB_per_step_vs_lora"], ".2f"),
              fmt(r["gathered_MiB_per_step"], ".1f"), fmt(r["resident_MiB"], ".1f"),
              fmt(r["step_ms"], ".0f"), fmt(r["step_ms_vs_lora"], ".2f"),
              {None: "-", True: "yes", False: "NO"}[r["same_values_on_every_rank"]]]
             for r in result["rows"]]
    print_table(caption, headers, table, "ll" + "r" * 9)


def launch(args, argv: list[str]) -> dict:
    """Run this module under torchrun (`-m bench.distributed`, standalone rendezvous on this
    host; the repository root on the ranks' PYTHONPATH, whatever the working directory) and
    return what rank 0 wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), SHIRA_FX_BENCH_OUT=out, PYTHONPATH=path)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", "-m", "bench.distributed", *argv]
        try:
            subprocess.run(cmd, env=env, check=True, timeout=args.timeout)
        except subprocess.TimeoutExpired as e:
            raise SystemExit(f"bench.distributed: the {args.nproc} ranks did not finish in "
                             f"{args.timeout:.0f} s") from e
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"bench.distributed: torchrun exited with status {e.returncode}") from e
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = BenchParser("distributed", __doc__, smoke="tiny model, aot_eager, 1 timed step")
    p.add_shape(hidden=256, layers=4, vocab=8000, batch=(2, "sequences per rank"), seq=256, r=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps per row (interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rows", default=None, help='only these, e.g. "DDP shira_fx,FSDP2 PEFT LoRA"')
    p.add_compiler(help="inner compiler (default inductor)")
    p.add_argument("--nproc", type=int, default=2, help="ranks when this module launches torchrun")
    p.add_threads("CPU threads per rank when this module launches torchrun",
                  default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_device()
    args = p.parse(argv, smoke=dict(hidden=64, layers=1, vocab=64, batch=2, seq=16, r=2, steps=1, warmup=1))
    if "RANK" not in os.environ:  # not under torchrun: relaunch under it
        result = launch(args, argv)
        report(result)
        return save(args, result)

    warnings.filterwarnings("ignore", category=FutureWarning)
    recompile_limit(64)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        result = worker(args)
    finally:
        dist.destroy_process_group()
    if result is not None:
        ratios(result["rows"])
        out = os.environ.get("SHIRA_FX_BENCH_OUT")
        if out:  # launched by this module: the parent reports
            write_json(out, result)
        else:
            report(result)
            save(args, result)
    return result


if __name__ == "__main__":
    main()
