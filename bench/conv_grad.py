"""The masked weight gradient of a convolution (`shira_fx::masked_conv_grad`): its two exact
paths, "sparse" (one SDDMM per kernel offset, no weight-sized tensor) and "dense" (the
convolution's own weight gradient, gathered), timed side by side on UNet-shaped layers at
several densities, with the path the cost model picks (`kernels.masked_conv.choose_path`) and
what the pick costs against the faster of the two (its regret). Also the time of the frozen
layer's input gradient (which every method pays) as the yardstick.

    python -m bench.conv_grad
    python -m bench.conv_grad --smoke    # tiny shapes, for the test suite
"""

from __future__ import annotations

import math

import torch

from bench.common import (
    BenchParser,
    bench_result,
    describe,
    fmt,
    machine,
    median_ms,
    print_table,
    ratio,
    save,
    torch_threads,
)
from shira_fx.kernels.masked_conv import choose_path, conv_weight_grad_at

# (channels in, channels out, kernel, spatial side): SD 1.5 UNet resnet and down/up-sampler
# convs at 64x64 latents (side halves per level), and a 1x1 shortcut
LAYERS = [(320, 320, 3, 64), (640, 640, 3, 32), (1280, 1280, 3, 16), (1280, 1280, 3, 8),
          (320, 640, 1, 32), (4, 320, 3, 64)]


def _layer(c_in: int, c_out: int, k: int, side: int, batch: int, density: float):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, side, side, generator=g)
    grad_y = torch.randn(batch, c_out, side, side, generator=g)
    shape = [c_out, c_in, k, k]
    numel = math.prod(shape)
    nnz = max(1, round(density * numel))
    indices = torch.randperm(numel, generator=g)[:nnz].sort().values
    return x, grad_y, indices, shape


def row(c_in: int, c_out: int, k: int, side: int, batch: int, density: float, repeat: int) -> dict:
    x, grad_y, indices, shape = _layer(c_in, c_out, k, side, batch, density)
    pad = [k // 2, k // 2]
    conv = dict(stride=[1, 1], padding=pad, dilation=[1, 1], groups=1)
    w = torch.randn(shape)
    times = {p: median_ms(lambda p=p: conv_weight_grad_at(x, grad_y, indices, shape, **conv, path=p), repeat)
             for p in ("sparse", "dense")}
    grad_x_ms = median_ms(lambda: torch.nn.grad.conv2d_input(x.shape, w, grad_y, padding=pad), repeat)
    exact = torch.allclose(conv_weight_grad_at(x, grad_y, indices, shape, **conv, path="sparse"),
                           conv_weight_grad_at(x, grad_y, indices, shape, **conv, path="dense"),
                           rtol=1e-4, atol=1e-3)
    pick = choose_path(x.device, x, grad_y, indices.numel(), shape)
    best = min(times.values())
    return {"layer": f"{c_in}->{c_out} {k}x{k} @{side}", "density": density, "nnz": indices.numel(),
            "sparse_ms": times["sparse"], "dense_ms": times["dense"], "grad_x_ms": grad_x_ms,
            "pick": pick, "faster": min(times, key=times.get), "regret": ratio(times[pick], best),
            "paths_agree": exact}


def main(argv: list[str] | None = None) -> dict:
    p = BenchParser("conv_grad", __doc__)
    p.add_argument("--batch", type=int, default=2, help="batch of latents")
    p.add_argument("--densities", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05])
    p.add_argument("--repeat", type=int, default=5, help="timed calls per path")
    p.add_argument("--scale", type=int, default=1, help="divide every channel count and side by this")
    p.add_threads("torch CPU threads (default: torch's)")
    args = p.parse(argv, smoke=dict(batch=1, densities=[0.01, 0.05], repeat=2, scale=8))
    layers = [(max(1, ci // args.scale), max(1, co // args.scale), k, max(2, s // args.scale))
              for ci, co, k, s in LAYERS]
    with torch_threads(args.threads):
        rows = [row(*shape, args.batch, d, args.repeat) for shape in layers for d in args.densities]
        info = machine()
    print_table(f"Masked conv weight gradient, batch {args.batch}: the two exact paths and the cost "
                f"model's pick; {describe(info)}",
                ["layer", "density", "sparse ms", "dense ms", "grad_x ms", "pick", "faster", "pick / best",
                 "agree"],
                [[r["layer"], f"{r['density']:.1%}", fmt(r["sparse_ms"], ".1f"), fmt(r["dense_ms"], ".1f"),
                  fmt(r["grad_x_ms"], ".1f"), r["pick"], r["faster"], fmt(r["regret"]),
                  "yes" if r["paths_agree"] else "NO"] for r in rows], align="lrrrrllrl")
    worst = max(r["regret"] for r in rows)
    print(f"\nworst regret of the pick: {worst:.2f}x (1.00 = always the faster path)")
    return save(args, bench_result("conv_grad", info, args, rows=rows, worst_regret=worst))


if __name__ == "__main__":
    main()
