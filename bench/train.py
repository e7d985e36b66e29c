"""Training cost side by side in one run: frozen base, PEFT LoRA, PEFT SHiRA and shira_fx
(eager and through its torch.compile backend) on a Llama built from a config, at equal
trainable parameters. Prints a markdown table and writes JSON.

    python bench/train.py            # hidden 512, 4 layers, batch 4x256 (a few minutes on CPU)
    python bench/train.py --smoke    # tiny shapes, for the test suite
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import shira_fx
from shira_fx.memory import saved_tensor_bytes, step_peak_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        max_position_embeddings=max(64, args.seq)))


def variants(args):
    """(name, model, trainable params, compile backend or None, forward kwargs maker)."""
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    frozen = build(args)
    frozen.requires_grad_(False)
    embeds = frozen.get_input_embeddings()(ids).detach()

    def frozen_inputs():
        return {"inputs_embeds": embeds.clone().requires_grad_(True), "labels": ids}

    def ids_inputs():
        return {"input_ids": ids, "labels": ids}

    yield "frozen base (floor)", frozen, [], "inductor", frozen_inputs
    lora_cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules=TARGETS)
    lora = peft.get_peft_model(build(args), lora_cfg)
    yield "PEFT LoRA", lora, [p for p in lora.parameters() if p.requires_grad], "inductor", ids_inputs
    pshira = peft.get_peft_model(build(args), peft.ShiraConfig(r=args.r, target_modules=TARGETS))
    yield "PEFT SHiRA", pshira, [p for p in pshira.parameters() if p.requires_grad], "inductor", ids_inputs
    for mode, recompute in (("eager", None), ("compiled", "auto"), ("compiled, recompute off", "off")):
        model = build(args)
        cfg = shira_fx.ShiraConfig(target_modules=TARGETS, r=args.r)
        adapter = shira_fx.prepare(model, cfg, progress=False)
        be = None if recompute is None else shira_fx.backend(cfg, recompute=recompute)
        yield f"shira_fx {mode}", (model, adapter), list(adapter.parameters()), be, ids_inputs


def measure(name, model, params, backend, inputs, args) -> dict:
    adapter = None
    if isinstance(model, tuple):
        model, adapter = model
    peak = step_peak_bytes(model, params, inputs(), None if adapter is None else adapter.attach)
    opt = torch.optim.AdamW(params or [torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    if adapter is not None:
        adapter.attach(opt)
    state = list(model.parameters()) + list(model.buffers())
    run = model if backend is None else torch.compile(model, backend=backend)
    times, held = [], 0
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        held, out = saved_tensor_bytes(lambda: run(**inputs()).loss, exclude=state)
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"variant": name, "trainable": sum(p.numel() for p in params),
            "peak_live_MiB_eager": peak / 2**20,
            "held_for_backward_MiB": held / 2**20, "step_ms": statistics.median(times) * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default="bench/train.json")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.batch, args.seq = 64, 1, 64, 2, 16
        args.r, args.steps, args.warmup, args.json = 2, 1, 1, None
    rows = [measure(*v, args) for v in variants(args)]
    floor = rows[0]["held_for_backward_MiB"]
    lora = next(r for r in rows if r["variant"] == "PEFT LoRA")
    print(f"\nLlama hidden {args.hidden}, {args.layers} layers, batch {args.batch}x{args.seq}, "
          f"all 7 linears, r={args.r}; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| variant | trainable | peak live MiB (eager step) | held for backward MiB | over floor | "
          "step ms (inductor unless eager) | step / LoRA |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['trainable']:,} | {r['peak_live_MiB_eager']:.1f} | "
              f"{r['held_for_backward_MiB']:.1f} | {r['held_for_backward_MiB'] - floor:+.1f} | "
              f"{r['step_ms']:.0f} | {r['step_ms'] / lora['step_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
