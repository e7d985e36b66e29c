"""MoE experts as SHiRA adapters: Qwen3-MoE and Mixtral from configs (no download), attention
and the experts' 3-D parameters adapted, shira_fx (`target_parameters`) vs PEFT LoRA with
`target_parameters` at equal trainable parameters, side by side in one run. Per row: bytes
held for backward (parameters excluded), the eager step's peak of live tensors (shira_fx's
dispatch-level tracker, the same yardstick for both) and the median step time (timed steps
interleaved in rounds, eager and compiled with aot_eager).

    python -m bench.moe
    python -m bench.moe --smoke       # tiny shapes, for the test suite
"""

from __future__ import annotations

import torch

import shira_fx
from bench.common import (
    BenchParser,
    TrainingRow,
    add_ratios_vs,
    bench_result,
    describe,
    fmt,
    machine,
    print_table,
    save,
    train_side_by_side,
)

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


class Runner(TrainingRow):
    def __init__(self, arch: str, method: str, mode: str, args):
        self.arch, self.method, self.mode = arch, method, mode
        self.model, self.params = variant(arch, method, args)
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        backend = shira_fx.backend(inner="aot_eager") if method == "shira_fx" else "aot_eager"
        self.run = self.model if mode == "eager" else torch.compile(self.model, backend=backend)

    def loss(self) -> torch.Tensor:
        return self.run(input_ids=self.ids, labels=self.ids).loss

    def measure(self) -> dict:
        return {"arch": self.arch, **super().measure()}


def main(argv: list[str] | None = None) -> dict:
    p = BenchParser("moe", __doc__)
    p.add_argument("--archs", default="qwen3_moe,mixtral")
    p.add_shape(hidden=256, layers=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_shape(vocab=2000, batch=2, seq=128, r=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    args = p.parse(argv, smoke=dict(hidden=64, layers=1, experts=4, vocab=64, seq=16, steps=1))
    runners = [Runner(a, m, mode, args) for a in args.archs.split(",")
               for m in ("PEFT LoRA", "shira_fx") for mode in ("eager", "compiled")]
    rows = train_side_by_side(runners, args.steps)
    add_ratios_vs(rows, "PEFT LoRA", same=("arch", "mode"))
    info = machine()
    print_table(
        f"MoE from configs: hidden {args.hidden}, {args.layers} layers, {args.experts} experts (top 2), "
        f"batch {args.batch}x{args.seq}, attention + experts, r={args.r}; {describe(info)}",
        ["arch", "method", "mode", "trainable", "held MiB", "/ LoRA", "eager peak MiB", "/ LoRA",
         "step ms", "/ LoRA"],
        [[r["arch"], r["method"], r["mode"], f"{r['trainable']:,}", fmt(r["held_for_backward_MiB"], ".1f"),
          fmt(r["held_vs_lora"]), fmt(r["step_peak_MiB"], ".1f"), fmt(r["peak_vs_lora"]),
          fmt(r["step_ms"], ".0f"), fmt(r["step_vs_lora"])] for r in rows], align="lllrrrrrrr")
    return save(args, bench_result("moe", info, args, rows=rows))


if __name__ == "__main__":
    main()
