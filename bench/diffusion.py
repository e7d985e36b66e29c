"""Diffusion models, side by side in one run (random weights from configs, no download):

(a) training a UNet's style targets (attention, feed-forwards, resnet convolutions):
    shira_fx vs PEFT LoRA (`unet.add_adapter`) at equal trainable count, eager and compiled:
    bytes held for backward (parameters excluded), the eager step's peak of live tensors
    (shira_fx's dispatch-level tracker, one yardstick for both), the median step time (steps
    interleaved in rounds);
(b) switching a style on an SD-1.5-shaped UNet (block_out_channels 320/640/1280/1280, fp32
    and bf16): an AdapterBank's `activate` from one style to another against diffusers' LoRA
    at the same trainable count, fused (`unfuse_lora` + `fuse_lora`) and unfused
    (`set_adapters`), the paper's CPU table as the anchor.

    python -m bench.diffusion
    python -m bench.diffusion --smoke     # tiny shapes, aot_eager, for the test suite
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

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
    median_ms,
    print_table,
    ratio,
    save,
    train_side_by_side,
    verdict,
)
from shira_fx.targets import DIFFUSION_TARGETS


def unet(channels: tuple[int, ...], cross: int, layers: int = 1, dtype: torch.dtype = torch.float32):
    """A UNet of these widths from a config, seeded, in `dtype` (diffusers' note that a cast
    model may need fp32 modules is about pretrained checkpoints: silenced)."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    blocks = len(channels)
    down = ("CrossAttnDownBlock2D",) * (blocks - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (blocks - 1)
    heads = 8 if channels[0] >= 320 else max(1, channels[0] // 8)
    return UNet2DConditionModel(block_out_channels=channels, layers_per_block=layers, sample_size=64,
                                down_block_types=down, up_block_types=up, cross_attention_dim=cross,
                                attention_head_dim=heads, norm_num_groups=min(32, channels[0] // 2)).to(dtype)


def _lora(model, r: int, name: str = "default") -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=DIFFUSION_TARGETS["unet"],  # the same layers
                     init_lora_weights="gaussian")
    model.add_adapter(cfg, adapter_name=name)
    return [p for p in model.parameters() if p.requires_grad]


class Trainer(TrainingRow):
    """One (method, mode) row of the training table."""

    def __init__(self, method: str, mode: str, args):
        self.method, self.mode = method, mode
        self.model = unet(tuple(args.channels), args.cross)
        self.model.requires_grad_(False)
        if method == "shira_fx":
            cfg = shira_fx.ShiraConfig(r=args.r, target_modules=DIFFUSION_TARGETS["unet"])
            self.params = list(shira_fx.prepare(self.model, cfg, progress=False).parameters())
            backend = shira_fx.backend(inner=args.compiler)
        else:
            self.params = _lora(self.model, args.r)
            backend = args.compiler
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        g = torch.Generator().manual_seed(0)
        size = args.sample
        self.batch = {"sample": torch.randn(args.batch, 4, size, size, generator=g),
                      "timestep": torch.randint(0, 1000, (args.batch,), generator=g),
                      "encoder_hidden_states": torch.randn(args.batch, 8, args.cross, generator=g)}
        self.run = self.model if mode == "eager" else torch.compile(self.model, backend=backend)

    def loss(self) -> torch.Tensor:
        return self.run(**self.batch).sample.pow(2).mean()


def training(args) -> list[dict]:
    runners = [Trainer(m, mode, args) for mode in ("eager", "compiled") for m in ("PEFT LoRA", "shira_fx")]
    rows = train_side_by_side(runners, args.steps)
    add_ratios_vs(rows, "PEFT LoRA")
    return rows


def _shira_styles(model, r: int, folder: str) -> shira_fx.AdapterBank:
    """Two style adapters (random values) at LoRA r's count, saved and loaded into a bank."""
    for i, name in enumerate(("a", "b")):
        adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(r=r, target_modules=DIFFUSION_TARGETS["unet"],
                                                               seed=i), progress=False)
        with torch.no_grad():
            for la in adapter.layers.values():
                la.values.normal_(0, 1e-3)
        adapter.save(f"{folder}/{name}.safetensors")
        adapter.remove()
    bank = shira_fx.AdapterBank(model)
    for name in ("a", "b"):
        bank.load(name, f"{folder}/{name}.safetensors")
    return bank


def _alternate(switch: Callable[[str], object]) -> Callable[[], None]:
    """A call that switches to "b", then "a", then "b"... by `switch(name)`."""
    at = {"name": "a"}

    def step() -> None:
        at["name"] = "b" if at["name"] == "a" else "a"
        switch(at["name"])

    return step


def _lora_fused_switch(model, name: str) -> None:
    model.unfuse_lora()
    model.set_adapters(name)
    model.fuse_lora(adapter_names=[name])


def _switch_row(dtype: torch.dtype, args) -> dict:
    model = unet(tuple(args.switch_channels), args.switch_cross, args.switch_layers, dtype)
    with tempfile.TemporaryDirectory() as folder:
        bank = _shira_styles(model, args.r, folder)
        nnz = sum(s.indices.numel() for s in bank._adapters["a"].values())
        bank.activate("a")
        shira_ms = median_ms(_alternate(bank.activate), args.repeat)
        bank.deactivate()
    del model
    lora = unet(tuple(args.switch_channels), args.switch_cross, args.switch_layers, dtype)
    lora.requires_grad_(False)
    for name in ("a", "b"):
        _lora(lora, args.r, name)
    params = sum(p.numel() for n, p in lora.named_parameters() if n.endswith((".a.weight", ".a.bias")))
    lora.set_adapters("a")
    lora.fuse_lora(adapter_names=["a"])
    fused_ms = median_ms(_alternate(lambda name: _lora_fused_switch(lora, name)), args.repeat)
    lora.unfuse_lora()
    unfused_ms = median_ms(_alternate(lora.set_adapters), args.repeat)
    return {"dtype": str(dtype).removeprefix("torch."), "shira_nnz": nnz, "lora_params": params,
            "shira_switch_ms": shira_ms, "lora_fuse_unfuse_ms": fused_ms, "lora_set_adapters_ms": unfused_ms,
            "vs_fuse_unfuse": ratio(shira_ms, fused_ms), "vs_set_adapters": ratio(shira_ms, unfused_ms)}


def main(argv: list[str] | None = None) -> dict:
    p = BenchParser("diffusion", __doc__)
    p.add_argument("--channels", type=int, nargs="+", default=[64, 128],
                   help="training UNet's block_out_channels")
    p.add_argument("--cross", type=int, default=64, help="training UNet's cross_attention_dim")
    p.add_argument("--sample", type=int, default=32, help="latent height and width")
    p.add_shape(batch=2, r=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_compiler()
    p.add_argument("--switch-channels", type=int, nargs="+", default=[320, 640, 1280, 1280],
                   help="switching UNet's block_out_channels (SD 1.5)")
    p.add_argument("--switch-cross", type=int, default=768, help="switching UNet's cross_attention_dim")
    p.add_argument("--switch-layers", type=int, default=2, help="switching UNet's layers_per_block")
    p.add_argument("--repeat", type=int, default=5, help="timed switches per row")
    args = p.parse(argv, smoke=dict(channels=[32, 64], cross=32, sample=16, steps=1, switch_channels=[32, 64],
                                    switch_cross=32, switch_layers=1, repeat=2, r=2))
    info = machine()
    train_rows = training(args)
    print_table(
        f"UNet style training: block_out_channels {tuple(args.channels)}, latents "
        f"{args.batch}x4x{args.sample}x{args.sample}, attention + feed-forwards + resnet convs, LoRA "
        f"r={args.r} and SHiRA at its count; compiled with {args.compiler}; {describe(info)}",
        ["method", "mode", "trainable", "held MiB", "/ LoRA", "eager peak MiB", "/ LoRA", "step ms",
         "/ LoRA"],
        [[r["method"], r["mode"], f"{r['trainable']:,}", fmt(r["held_for_backward_MiB"], ".1f"),
          fmt(r["held_vs_lora"]), fmt(r["step_peak_MiB"], ".1f"), fmt(r["peak_vs_lora"]),
          fmt(r["step_ms"], ".0f"), fmt(r["step_vs_lora"])] for r in train_rows], align="llrrrrrrr")
    switch_rows = [_switch_row(dtype, args) for dtype in (torch.float32, torch.bfloat16)]
    print_table(
        f"Style switch on a UNet with block_out_channels {tuple(args.switch_channels)} (SD 1.5's shape), "
        f"r={args.r}: AdapterBank.activate a -> b vs diffusers LoRA; {describe(info)}",
        ["dtype", "SHiRA values", "LoRA params", "shira_fx ms", "LoRA unfuse+fuse ms", "LoRA set_adapters ms",
         "/ fuse", "/ set_adapters"],
        [[r["dtype"], f"{r['shira_nnz']:,}", f"{r['lora_params']:,}", fmt(r["shira_switch_ms"], ".1f"),
          fmt(r["lora_fuse_unfuse_ms"], ".1f"), fmt(r["lora_set_adapters_ms"], ".2f"),
          fmt(r["vs_fuse_unfuse"], ".3f"), fmt(r["vs_set_adapters"])] for r in switch_rows], align="lrrrrrrr")
    shira = [r for r in train_rows if r["method"] == "shira_fx"]
    print(f"{verdict(all(r['held_vs_lora'] <= 1.0 for r in shira))}: held for backward <= PEFT LoRA's")
    print(f"{verdict(all(r['step_vs_lora'] <= 1.0 for r in shira))}: step time <= 1.0x PEFT LoRA's")
    fast_switch = all(r["vs_fuse_unfuse"] <= 0.1 for r in switch_rows)
    print(f"{verdict(fast_switch)}: switch <= 0.1x LoRA unfuse + fuse")
    return save(args, bench_result("diffusion", info, args, training=train_rows, switching=switch_rows))


if __name__ == "__main__":
    main()
