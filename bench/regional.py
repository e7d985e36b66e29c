"""Regional compilation: a deep Llama (from a config, no download) compiled whole vs block by
block (`layer.compile(...)` for every decoder layer), shira_fx vs PEFT LoRA at equal trainable
parameters, side by side in one run. Per row: the cold start (the first training step,
compilation included), the median step after it, and how many graphs Dynamo compiled.

    python -m bench.regional                   # hidden 256, 24 layers, batch 2x128, Inductor
    python -m bench.regional --layers 32
    python -m bench.regional --smoke           # 2 layers, aot_eager, for the test suite
"""

from __future__ import annotations

import statistics
import time

import torch
from torch._dynamo.utils import counters

import shira_fx
from bench.common import BenchParser, bench_result, describe, fmt, llama, machine, print_table, ratio, save

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _build(method: str, args):
    """(model, trainable parameters, backend) for one method."""
    model = llama(args.hidden, args.layers, args.vocab, args.seq)
    if method == "shira_fx":
        adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(target_modules=TARGETS, r=args.r),
                                   progress=False)
        return model, list(adapter.parameters()), shira_fx.backend(inner=args.compiler)
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                       target_modules=TARGETS))
    return model, [p for p in model.parameters() if p.requires_grad], args.compiler


def _blocks(model) -> list[torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers)


def measure(method: str, how: str, args) -> dict:
    torch._dynamo.reset()
    counters.clear()
    model, params, backend = _build(method, args)
    opt = torch.optim.AdamW(params, lr=1e-3)
    blocks = _blocks(model)
    if how == "whole":
        run = torch.compile(model, backend=backend)
    else:
        for block in blocks:
            block.compile(backend=backend)
        run = model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)

    def step() -> float:
        t0 = time.perf_counter()
        loss = run(input_ids=ids, labels=ids, use_cache=False).loss  # no KV cache: no per-layer guard
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    cold = step()
    times = [step() for _ in range(args.steps)]
    return {
        "method": method, "compiled": how, "trainable": sum(p.numel() for p in params),
        "cold_start_s": cold, "step_ms": statistics.median(times) * 1e3,
        "graphs": counters["stats"]["unique_graphs"], "blocks": len(blocks),
    }


def main(argv: list[str] | None = None) -> dict:
    p = BenchParser("regional", __doc__, smoke="2 layers, aot_eager, 2 steps")
    p.add_shape(hidden=256, layers=24, vocab=2000, batch=2, seq=128, r=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps after the cold start")
    p.add_compiler(help="inner compiler (inductor, aot_eager; default inductor)")
    args = p.parse(argv, smoke=dict(hidden=64, layers=2, vocab=64, seq=16, steps=2, compiler="aot_eager"))
    rows = [measure(method, how, args)
            for method in ("PEFT LoRA", "shira_fx") for how in ("whole", "by block")]
    ref = {r["compiled"]: r for r in rows if r["method"] == "PEFT LoRA"}
    for r in rows:
        r["cold_start_vs_lora_whole"] = ratio(r["cold_start_s"], ref["whole"]["cold_start_s"])
        r["step_vs_lora_same"] = ratio(r["step_ms"], ref[r["compiled"]]["step_ms"])
    info = machine()
    print_table(
        f"Llama from a config: hidden {args.hidden}, {args.layers} layers, batch {args.batch}x"
        f"{args.seq}, all 7 linears, r={args.r}, torch.compile({args.compiler}); {describe(info)}",
        ["method", "compiled", "trainable", "graphs", "cold start s",
         "/ LoRA whole", "step ms", "/ LoRA (same)"],
        [[r["method"], r["compiled"], f"{r['trainable']:,}", r["graphs"], fmt(r["cold_start_s"], ".1f"),
          fmt(r["cold_start_vs_lora_whole"]), fmt(r["step_ms"], ".0f"), fmt(r["step_vs_lora_same"])]
         for r in rows])
    return save(args, bench_result("regional", info, args, rows=rows))


if __name__ == "__main__":
    main()
