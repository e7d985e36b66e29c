"""MoE experts as SHiRA adapters: Qwen3-MoE and Mixtral from configs (no download), attention
and the experts' 3-D parameters adapted, shira_fx (`target_parameters`) vs PEFT LoRA with
`target_parameters` at equal trainable parameters, side by side in one run. Per row: bytes
held for backward (parameters excluded), the eager step's peak of live tensors (shira_fx's
dispatch-level tracker, the same yardstick for both) and the median step time (timed steps
interleaved in rounds, eager and compiled with aot_eager).

    python bench/moe.py
    python bench/moe.py --smoke       # tiny shapes, for the test suite
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import default_json, describe, fmt, machine, markdown_table, ratio, write_json  # noqa: E402

import shira_fx  # noqa: E402
from shira_fx.memory import LiveTensorTracker, resident_state, saved_tensor_bytes  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(arch: str, args):
    import transformers

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                  head_dim=args.hidden // heads, max_position_embeddings=max(64, args.seq),
                  num_experts_per_tok=2)
    if arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(num_experts=args.experts, moe_intermediate_size=args.hidden,
                                          intermediate_size=2 * args.hidden, decoder_sparse_step=1, **common)
        return transformers.Qwen3MoeForCausalLM(cfg)
    cfg = transformers.MixtralConfig(num_local_experts=args.experts, intermediate_size=args.hidden, **common)
    return transformers.MixtralForCausalLM(cfg)


def variant(arch: str, method: str, args):
    """(model, trainable parameters) for one method at r=args.r."""
    model = build(arch, args)
    if method == "shira_fx":
        cfg = shira_fx.ShiraConfig(r=args.r, target_modules=ATTENTION, target_parameters=EXPERTS)
        return model, list(shira_fx.prepare(model, cfg, progress=False).parameters())
    import peft

    lora = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=ATTENTION,
                           target_parameters=EXPERTS)
    model = peft.get_peft_model(model, lora)
    return model, [p for p in model.parameters() if p.requires_grad]


class Runner:
    def __init__(self, arch: str, method: str, mode: str, args):
        self.arch, self.method, self.mode = arch, method, mode
        self.model, self.params = variant(arch, method, args)
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        backend = shira_fx.backend(inner="aot_eager") if method == "shira_fx" else "aot_eager"
        self.run = self.model if mode == "eager" else torch.compile(self.model, backend=backend)
        self.times: list[float] = []

    def loss(self) -> torch.Tensor:
        return self.run(input_ids=self.ids, labels=self.ids).loss

    def step(self) -> float:
        t0 = time.perf_counter()
        self.loss().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def measure(self) -> dict:
        state = resident_state(self.model)
        held, loss = saved_tensor_bytes(self.loss, exclude=state)
        loss.backward()
        self.opt.zero_grad(set_to_none=True)
        peak = None
        if self.mode == "eager":
            with LiveTensorTracker() as tracker:
                self.loss().backward()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            peak = tracker.peak_bytes / 2**20
        return {"arch": self.arch, "method": self.method, "mode": self.mode,
                "trainable": sum(p.numel() for p in self.params), "held_for_backward_MiB": held / 2**20,
                "step_peak_MiB": peak}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="qwen3_moe,mixtral")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.experts, args.vocab, args.seq, args.steps = 64, 1, 4, 64, 16, 1
    if args.json is None and not args.smoke:
        args.json = default_json("moe")
    runners = [Runner(a, m, mode, args) for a in args.archs.split(",")
               for m in ("PEFT LoRA", "shira_fx") for mode in ("eager", "compiled")]
    rows = []
    for r in runners:
        r.step()  # warm-up (compiles)
        rows.append(r.measure())
    for _ in range(args.steps):  # interleaved rounds: a shared machine's noise hits all alike
        for r in runners:
            r.times.append(r.step())
    for r, row in zip(runners, rows, strict=True):
        row["step_ms"] = statistics.median(r.times) * 1e3
    for row in rows:
        lora = next(x for x in rows if x["arch"] == row["arch"] and x["mode"] == row["mode"]
                    and x["method"] == "PEFT LoRA")
        row["held_vs_lora"] = ratio(row["held_for_backward_MiB"], lora["held_for_backward_MiB"])
        row["peak_vs_lora"] = ratio(row["step_peak_MiB"], lora["step_peak_MiB"])
        row["step_vs_lora"] = ratio(row["step_ms"], lora["step_ms"])
    info = machine()
    print(f"\nMoE from configs: hidden {args.hidden}, {args.layers} layers, {args.experts} experts (top 2), "
          f"batch {args.batch}x{args.seq}, attention + experts, r={args.r}; {describe(info)}\n")
    print(markdown_table(
        ["arch", "method", "mode", "trainable", "held MiB", "/ LoRA", "eager peak MiB", "/ LoRA",
         "step ms", "/ LoRA"],
        [[r["arch"], r["method"], r["mode"], f"{r['trainable']:,}", fmt(r["held_for_backward_MiB"], ".1f"),
          fmt(r["held_vs_lora"]), fmt(r["step_peak_MiB"], ".1f"), fmt(r["peak_vs_lora"]),
          fmt(r["step_ms"], ".0f"), fmt(r["step_vs_lora"])] for r in rows], align="lllrrrrrrr"))
    result = {"bench": "moe", "machine": info, "args": vars(args), "rows": rows}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
