"""Training cost side by side in one run, on Llamas built from configs (no download): the frozen
base (the floor: backward through every layer, nothing trained), full fine-tuning, PEFT LoRA
(dropout 0 and 0.05), PEFT SHiRA and shira_fx, each eager and compiled, shira_fx also with
its recompute pass off; the adapters at equal trainable parameters (r*(out+in) per weight).

Per row, after warm-up (compilation): the bytes autograd holds for backward (unique saved
storages, parameters excluded; seen through compiled graphs too), the whole-step peak of live
tensors above what stays resident (forward, backward, AdamW step, zero_grad) from the CPU
allocator's own accounting (torch.profiler, `profile_memory`; it sees inside compiled code)
or `torch.cuda.max_memory_allocated` on CUDA, the same step under shira_fx's dispatch-level
tracker (which runs the module eagerly: a dispatch mode bypasses compiled code), what stays
resident (weights, adapter, optimizer state) and the median step time (the timed steps of all
rows of a size run interleaved in rounds, so a shared machine's noise hits all alike; PEFT
SHiRA compiles with graph breaks at its sparse_coo_tensor, as it does for its users). Ratios compare with
PEFT LoRA (dropout 0) and with the frozen floor of the same mode, and the issue's targets are
printed as pass/miss lines. Prints markdown tables and writes JSON.

    python -m bench.train                    # hidden 256 and 512, 4 layers, batch 4x256
    python -m bench.train --sizes 512x8      # other sizes: hidden[xlayers][rRANK]
    python -m bench.train --sizes wide --modes compiled   # hidden 2048, 2 layers, r=8 and r=32:
                                             # the width users adapt, at 0.8 % / 3 % per weight
    python -m bench.train --smoke            # tiny shapes, aot_eager, for the test suite
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import peft
import torch
from torch import nn
from transformers import LlamaForCausalLM

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
    unique_bytes,
    verdict,
)
from shira_fx.memory import LiveTensorTracker, resident_state, saved_tensor_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FLOOR, LORA, LORA_DROP, PSHIRA = "frozen base (floor)", "PEFT LoRA", "PEFT LoRA dropout 0.05", "PEFT SHiRA"
OURS, OURS_OFF, OURS_STRUCT = "shira_fx", "shira_fx recompute off", "shira_fx struct"
MiB = 2**20


@dataclass
class Variant:
    """One row: a model to train, what trains, and how the step is compiled (None: eager)."""

    name: str
    mode: str
    model: nn.Module
    params: list[nn.Parameter]
    backend: object
    inputs: Callable[[], dict]
    adapter: shira_fx.SparseAdapter | None = None
    extra: list[torch.Tensor] = field(default_factory=list)  # resident tensors beyond params/buffers


# `--sizes wide`: a width users adapt (2048 wide layers, 0.8 % of each weight at r=8, 3 % at r=32)
WIDE = "2048x2r8,2048x2r32"


def parse_sizes(spec: str, layers: int, r: int) -> list[tuple[int, int, int]]:
    """'256,512x8,2048x2r32' -> [(256, layers, r), (512, 8, r), (2048, 2, 32)]; 'wide' stands for
    WIDE."""
    out = []
    for item in spec.replace("wide", WIDE).split(","):
        shape, _, rank = item.strip().partition("r")
        hidden, _, n = shape.partition("x")
        out.append((int(hidden), int(n) if n else layers, int(rank) if rank else r))
    return out


def build(hidden: int, layers: int, args) -> LlamaForCausalLM:
    return llama(hidden, layers, args.vocab, args.seq, args.device).to(getattr(torch, args.dtype))


def variants(hidden: int, layers: int, r: int, args) -> Iterator[Variant]:
    """Every row for one model size, built lazily so only one model lives at a time."""
    device = torch.device(args.device)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0)).to(device)
    compiled = [m for m in ("eager", "compiled") if m in args.modes.split(",")]

    def ids_inputs() -> dict:
        return {"input_ids": ids, "labels": ids}

    def trainable(model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    for mode in compiled:
        be = None if mode == "eager" else args.compiler
        frozen = build(hidden, layers, args)
        frozen.requires_grad_(False)
        embeds = frozen.get_input_embeddings()(ids).detach()
        yield Variant(FLOOR, mode, frozen, [], be,
                      lambda e=embeds: {"inputs_embeds": e.clone().requires_grad_(True), "labels": ids})
        full = build(hidden, layers, args)
        yield Variant("full fine-tuning", mode, full, list(full.parameters()), be, ids_inputs)
        for name, dropout in ((LORA, 0.0), (LORA_DROP, 0.05)):
            cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                  target_modules=TARGETS)
            lora = peft.get_peft_model(build(hidden, layers, args), cfg)
            yield Variant(name, mode, lora, trainable(lora), be, ids_inputs)
        pshira = peft.get_peft_model(build(hidden, layers, args),
                                     peft.ShiraConfig(r=r, target_modules=TARGETS))
        indices = [t for m in pshira.modules() for t in getattr(m, "shira_indices", {}).values()]
        yield Variant(PSHIRA, mode, pshira, trainable(pshira), be, ids_inputs, extra=indices)
        for name, recompute, mask in ((OURS, "auto", "rand"), (OURS_OFF, "off", "rand"),
                                      (OURS_STRUCT, "auto", "struct")):
            if mode == "eager" and recompute == "off":
                continue  # the recompute pass only exists under compilation
            model = build(hidden, layers, args)
            cfg = shira_fx.ShiraConfig(target_modules=TARGETS, r=r, mask=mask)
            adapter = shira_fx.prepare(model, cfg, progress=False)
            be_ours = (None if mode == "eager"
                       else shira_fx.backend(inner=args.compiler, recompute=recompute))
            extra = [t for layer in adapter.layers.values() for t in (layer.indices, layer.base)]
            yield Variant(name, mode, model, list(adapter.parameters()), be_ours, ids_inputs, adapter, extra)


def allocator_step_peak(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during `step` above what was allocated before it, by the
    allocator's own accounting, so compiled code is seen too."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    events = [n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
              if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu"]
    live = top = 0
    for n in sorted(events, key=lambda n: n.start_time_ns):
        live += n.extra_fields.alloc_size
        top = max(top, live)
    return top


class Runner:
    """One row's model, optimizer and (compiled) step, kept alive so that the timed steps of
    all rows can be interleaved: noise from other jobs on a shared machine then hits every row
    alike instead of whichever row ran when it struck."""

    def __init__(self, v: Variant, args):
        self.v, self.device = v, torch.device(args.device)
        self.opt = torch.optim.AdamW(v.params or [nn.Parameter(torch.zeros(1, device=self.device))], lr=1e-5)
        if v.adapter is not None:
            v.adapter.check_optimizer(self.opt)
        self.state = resident_state(v.model)
        self.run = v.model if v.backend is None else torch.compile(v.model, backend=v.backend)
        self.times: list[float] = []

    def step(self, fwd: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        loss = (fwd or (lambda: self.run(**self.v.inputs()).loss))()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def timed_steps(self, n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            self.loss = self.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times.append(time.perf_counter() - t0)

    def measure_memory(self, warmup: int) -> dict:
        """Warm up (compile), then one step each for held-for-backward bytes, the allocator
        peak and the tracker peak."""
        v = self.v
        t0 = time.perf_counter()
        for _ in range(warmup):
            self.step()
        warm_s = time.perf_counter() - t0
        held = 0

        def held_fwd() -> torch.Tensor:
            nonlocal held
            held, loss = saved_tensor_bytes(lambda: self.run(**v.inputs()).loss, exclude=self.state)
            return loss

        self.step(held_fwd)
        opt_state = [t for s in self.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        resident = unique_bytes(self.state + v.params + opt_state + v.extra)
        peak = allocator_step_peak(self.step, self.device)
        cuda_max = torch.cuda.max_memory_allocated(self.device) / MiB if self.device.type == "cuda" else None
        with LiveTensorTracker() as tracker:  # runs the module eagerly (see the docstring)
            self.step(lambda: v.model(**v.inputs()).loss)
        row = {"variant": v.name, "mode": v.mode, "trainable": sum(p.numel() for p in v.params),
               "resident_MiB": resident / MiB, "held_for_backward_MiB": held / MiB,
               "step_peak_MiB": peak / MiB, "tracker_peak_MiB_eager": tracker.peak_bytes / MiB,
               "warmup_s": warm_s}
        if cuda_max is not None:
            row["cuda_max_allocated_MiB"] = cuda_max
        return row

    def timing(self) -> dict:
        return {"step_ms": statistics.median(self.times) * 1e3, "step_ms_min": min(self.times) * 1e3,
                "step_ms_all": [t * 1e3 for t in self.times], "loss": self.loss.item()}


def measure_size(hidden: int, layers: int, r: int, args) -> list[dict]:
    """Every row of one model size: memory row by row, then step times in interleaved rounds."""
    runners, rows = [], []
    for v in variants(hidden, layers, r, args):
        if args.variants and v.name not in args.variants.split(",") and v.name != FLOOR:
            continue
        runners.append(Runner(v, args))
        rows.append(runners[-1].measure_memory(args.warmup))
        print(f"  {hidden}x{layers}r{r} {v.name} ({v.mode}): warm-up {rows[-1]['warmup_s']:.0f} s, "
              f"held {rows[-1]['held_for_backward_MiB']:.1f} MiB", file=sys.stderr)
    # a later row's compile can invalidate an earlier row's cache entries (PEFT SHiRA's graph
    # breaks turn shared transformers functions into frames of their own): settle every row
    # with untimed steps until nothing compiles any more
    for _ in range(4):
        compiles = sum(torch._dynamo.utils.counters["frames"].values())
        for runner in runners:
            runner.step()
        if sum(torch._dynamo.utils.counters["frames"].values()) == compiles:
            break
    compiles = sum(torch._dynamo.utils.counters["frames"].values())
    rounds = max(1, min(args.rounds, args.steps))
    for i in range(rounds):
        for runner in runners:  # spread args.steps over the rounds
            runner.timed_steps(args.steps // rounds + (i < args.steps % rounds))
    recompiled = sum(torch._dynamo.utils.counters["frames"].values()) - compiles
    if recompiled:
        print(f"  warning: {recompiled} frames compiled during the timed steps", file=sys.stderr)
    for row, runner in zip(rows, runners, strict=True):
        row.update(runner.timing(), frames_compiled_while_timing=recompiled)
        print(f"  {hidden}x{layers}r{r} {row['variant']} ({row['mode']}): {row['step_ms']:.0f} ms/step",
              file=sys.stderr)
    del runners
    torch._dynamo.reset()
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Ratios against PEFT LoRA (dropout 0) and the frozen floor of the same mode."""
    def same_mode(r: dict) -> tuple[dict | None, dict | None]:
        same = {x["variant"]: x for x in rows if x["mode"] == r["mode"]}
        return same.get(FLOOR), same.get(LORA)

    for r in rows:
        floor, _ = same_mode(r)
        for key in ("held_for_backward", "step_peak"):
            r[f"{key}_over_floor_MiB"] = None if floor is None else r[f"{key}_MiB"] - floor[f"{key}_MiB"]
    for r in rows:
        floor, lora = same_mode(r)
        for key in ("held_for_backward", "step_peak"):
            lora_extra = None if lora is None else lora[f"{key}_over_floor_MiB"]
            r[f"{key}_extra_vs_lora"] = ratio(r[f"{key}_over_floor_MiB"], lora_extra)
        r["step_peak_vs_lora"] = ratio(r["step_peak_MiB"], lora and lora["step_peak_MiB"])
        r["step_ms_vs_lora"] = ratio(r["step_ms"], lora and lora["step_ms"])
        r["step_ms_vs_floor"] = ratio(r["step_ms"], floor and floor["step_ms"])


def targets(rows: list[dict]) -> list[dict]:
    """The benchmarks issue's targets, on the compiled rows (shira_fx's default backend)."""
    got = {x["variant"]: x for x in rows if x["mode"] == "compiled"}
    if OURS not in got:
        return []
    ours = got[OURS]
    out = []

    def add(what: str, value: float | None, limit: float) -> None:
        out.append({"target": what, "value": value, "limit": limit,
                    "pass": None if value is None else value <= limit})

    for limit in (0.25, 0.8):
        add("held for backward, extra over the floor, vs PEFT LoRA's extra",
            ours["held_for_backward_extra_vs_lora"], limit)
        add("whole-step peak, extra over the floor, vs PEFT LoRA's extra",
            ours["step_peak_extra_vs_lora"], limit)
    if LORA_DROP in got:
        add("whole-step peak vs PEFT LoRA dropout 0.05",
            ratio(ours["step_peak_MiB"], got[LORA_DROP]["step_peak_MiB"]), 0.85)
    if PSHIRA in got:
        add("whole-step peak vs PEFT SHiRA", ratio(ours["step_peak_MiB"], got[PSHIRA]["step_peak_MiB"]), 0.85)
    add("step time vs PEFT LoRA (rand mask)", ours["step_ms_vs_lora"], 0.95)
    if OURS_STRUCT in got:
        add("step time vs PEFT LoRA (struct mask)", got[OURS_STRUCT]["step_ms_vs_lora"], 0.85)
    return out


def print_size(res: dict, info: dict, args) -> None:
    cuda = args.device.startswith("cuda")
    caption = (f"Llama hidden {res['hidden']}, intermediate {res['intermediate']}, {res['layers']} layers, "
               f"vocab {args.vocab}, batch {args.batch}x{args.seq}, all 7 linears, r={res['r']}, AdamW; "
               f"compiled = {args.compiler}; {describe(info)}")
    headers = ["variant", "mode", "trainable", "resident MiB", "held for bwd MiB", "held over floor",
               "held extra / LoRA's", "step peak MiB", "peak over floor", "peak / LoRA",
               "tracker peak MiB (eager)"] + (["CUDA max alloc MiB"] if cuda else []) + [
               "step ms", "step / LoRA", "step / floor"]
    table = []
    for r in res["rows"]:
        table.append([r["variant"], r["mode"], f"{r['trainable']:,}", fmt(r["resident_MiB"], ".1f"),
                      fmt(r["held_for_backward_MiB"], ".1f"),
                      fmt(r["held_for_backward_over_floor_MiB"], "+.1f"),
                      fmt(r["held_for_backward_extra_vs_lora"], ".2f"), fmt(r["step_peak_MiB"], ".1f"),
                      fmt(r["step_peak_over_floor_MiB"], "+.1f"), fmt(r["step_peak_vs_lora"], ".2f"),
                      fmt(r["tracker_peak_MiB_eager"], ".1f")]
                     + ([fmt(r.get("cuda_max_allocated_MiB"), ".1f")] if cuda else [])
                     + [fmt(r["step_ms"], ".0f"), fmt(r["step_ms_vs_lora"], ".2f"),
                        fmt(r["step_ms_vs_floor"], ".2f")])
    print_table(caption, headers, table, align="ll" + "r" * (len(headers) - 2))
    print()
    for t in res["targets"]:
        print(f"{verdict(t['pass'])}: shira_fx compiled, {t['target']}: {fmt(t['value'], '.3f')} "
              f"(target <= {t['limit']})")


def main(argv: list[str] | None = None) -> dict:
    p = BenchParser("train", __doc__, smoke="one tiny model, aot_eager, 1 step")
    p.add_argument("--sizes", default="256,512",
                   help=f"hidden[xlayers][rRANK],... (layers default --layers, RANK --r); wide = {WIDE}")
    p.add_shape(layers=(4, "decoder layers where --sizes gives none"), vocab=8000, batch=4, seq=256, r=8)
    p.add_argument("--steps", type=int, default=12, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4, help="the timed steps of all rows interleave in rounds")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--variants", default=None, help="only these rows (names, comma-separated; floor always)")
    p.add_compiler()
    p.add_device()
    p.add_argument("--dtype", default="float32", help="the model's dtype (float32, bfloat16)")
    args = p.parse(argv, smoke=dict(sizes="64x1", vocab=64, batch=2, seq=16, r=2, steps=1, warmup=1))
    info = machine(args.device)
    # every row of a size stays compiled at once (interleaved timing): the same Llama frames are
    # compiled once per row, more than Dynamo's default limit of 8 per code object
    recompile_limit(64)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations
    warnings.filterwarnings("ignore", message=".*lru_cache")  # Dynamo tracing PEFT SHiRA's forward,
    warnings.filterwarnings("ignore", message=".*sparse_coo_tensor")  # which breaks the graph there
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # PEFT SHiRA's sparse_coo
    t_start = time.perf_counter()
    results = []
    for hidden, layers, r in parse_sizes(args.sizes, args.layers, args.r):
        rows = measure_size(hidden, layers, r, args)
        add_ratios(rows)
        res = {"hidden": hidden, "layers": layers, "r": r, "intermediate": hidden * 11 // 4,
               "rows": rows, "targets": targets(rows)}
        results.append(res)
        print_size(res, info, args)
    return save(args, bench_result("train", info, args, sizes=results, seconds=time.perf_counter() - t_start))


if __name__ == "__main__":
    main()
