"""Microbenchmarks of the two kernels SHiRA training and switching stand on, each against what
one would write without them, judged against the machine's copy bandwidth.

(a) Masked gradient (SDDMM): `grad[k] = sum_t grad_y[t, row_k] * x[t, col_k]` for a square
    (N, N) weight. shira_fx runs `kernels.sddmm` (Triton) on CUDA and `kernels.sddmm_cpu`
    (`torch.sparse.sampled_addmm`) on CPU, the same choice `shira_fx.ops.masked_grad` makes.
    The dense alternative forms dW = grad_y.T @ x (N x N) and gathers it at the indices.
(b) Scatter: `W.flat[idx] = base + delta` over `--layers` weights of N x N. shira_fx's
    `ops.scatter_weights_` (one Triton `scatter_fused_` launch on CUDA; `index_copy_` split
    over threads on CPU) vs a loop of `index_copy_` (int64 indices prepared beforehand), a
    loop of `index_put_` (int32 indices, as stored), and PEFT SHiRA's merge, reproduced with
    the exact torch ops of peft/tuners/shira/layer.py (`Linear.merge` -> `get_delta_weight`):
    `W += torch.sparse_coo_tensor(indices_2d_int32, values * scaling, (out, in))`.

GB/s = bytes the operation must move / median time, the same byte count for every method of
one op: SDDMM reads grad_y and x once (T x N each), the int32 indices and writes nnz fp32
results; the scatter reads int32 indices, base and delta (nnz each) and reads and writes every
distinct cache line (64 B; 32 B sectors on CUDA) of the weights it touches. "x copy" divides
by the bandwidth of `dst.copy_(src)` on 256 MiB buffers (1 GiB on CUDA) measured in the same
run. Times: `triton.testing.do_bench` (median) on CUDA, median of `--repeat` after warm-up on CPU.

    python bench/kernels.py              # N = 1024..4096 on CPU (..8192 on CUDA), 4 densities
    python bench/kernels.py --smoke      # tiny shapes, a few seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    copy_bandwidth,
    default_json,
    describe,
    fmt,
    machine,
    markdown_table,
    median_ms,
    write_json,
)

from shira_fx.kernels import sddmm, sddmm_cpu  # noqa: E402
from shira_fx.ops import scatter_weights_  # noqa: E402

DENSITIES = (0.005, 0.01, 0.02, 0.05)


def masked_grad_kernel(device: torch.device) -> Callable:
    """The SDDMM shira_fx.ops.masked_grad runs on this device."""
    return sddmm if device.type == "cuda" else sddmm_cpu


def random_indices(perm: torch.Tensor, nnz: int) -> torch.Tensor:
    """Sorted int32 flat offsets, as a SparseAdapter stores them: the first nnz of a random
    permutation, so the masks of one weight are nested across densities."""
    return perm[:nnz].sort().values.to(torch.int32)


def lines_touched(idx: torch.Tensor, element_size: int, line: int) -> int:
    """Distinct cache lines (or sectors) a scatter at these flat offsets reads and writes."""
    return int(torch.unique(idx.long() * element_size // line).numel())


def sddmm_rows(n: int, densities: list[float], tokens: int, dtype: torch.dtype,
               device: torch.device, repeat: int, bandwidth: float) -> list[dict]:
    """Time the masked gradient and the dense alternative at each density for one N."""
    g = torch.Generator(device="cpu").manual_seed(n)
    grad_y = torch.randn(tokens, n, generator=g, dtype=dtype).to(device)
    x = torch.randn(tokens, n, generator=g, dtype=dtype).to(device)
    perm = torch.randperm(n * n, generator=g).to(device)
    ours = masked_grad_kernel(device)
    rows = []
    for d in densities:
        nnz = max(1, round(d * n * n))
        idx = random_indices(perm, nnz)
        idx64 = idx.long()  # prepared once: the dense path gets its best case

        def run_ours(idx=idx):
            return ours(grad_y, x, idx, n)

        def run_dense(idx64=idx64):
            return (grad_y.t() @ x).float().view(-1).index_select(0, idx64)

        err = (run_ours() - run_dense()).abs().max().item()
        scale = run_dense().abs().max().item() or 1.0
        must = tokens * 2 * n * grad_y.element_size() + nnz * 4 + nnz * 4
        for method, fn, flops in (
            ("shira_fx masked_grad (" + ("Triton sddmm" if device.type == "cuda"
                                         else "sddmm_cpu: sampled_addmm") + ")", run_ours, 2 * tokens * nnz),
            ("dense grad_y.T @ x + gather", run_dense, 2 * tokens * n * n),
        ):
            ms = median_ms(fn, repeat, warmup=1, device=device)
            gbs = must / (ms / 1e3) / 1e9
            rows.append({"op": "sddmm", "size": n, "density": d, "nnz": nnz, "tokens": tokens,
                         "method": method, "median_ms": ms, "bytes": must, "GB_per_s": gbs,
                         "x_copy_bandwidth": gbs * 1e9 / bandwidth, "GFLOP_per_s": flops / (ms / 1e3) / 1e9,
                         "max_rel_err": err / scale})
        dense_ms = rows[-1]["median_ms"]
        for r in rows[-2:]:
            r["vs_dense"] = r["median_ms"] / dense_ms
    return rows


def peft_shira_merge(weights: list[torch.Tensor], indices_2d: list[torch.Tensor],
                     values: list[torch.Tensor], scaling: float = 1.0) -> None:
    """PEFT SHiRA's `Linear.merge` (safe_merge=False) per layer, with its exact torch ops:
    `get_delta_weight` builds a sparse COO tensor from the int32 (2, nnz) indices and
    `values * scaling`, and `orig_weight += delta_weight` adds it to the dense weight (then
    `set_base_weight` rebinds `.data` to the same tensor, which costs nothing)."""
    for w, ind, v in zip(weights, indices_2d, values, strict=True):
        ind = ind.to(v.device)
        delta = torch.sparse_coo_tensor(ind, v * scaling, w.shape)
        w += delta


def scatter_rows(n: int, layers: int, densities: list[float], dtype: torch.dtype,
                 device: torch.device, repeat: int, bandwidth: float) -> list[dict]:
    """Time the fused scatter and its alternatives over `layers` N x N weights per density."""
    g = torch.Generator(device="cpu").manual_seed(1000 + n)
    weights = [torch.randn(n, n, generator=g, dtype=dtype).to(device) for _ in range(layers)]
    perms = [torch.randperm(n * n, generator=g).to(device) for _ in range(layers)]
    line = 32 if device.type == "cuda" else 64
    rows = []
    for d in densities:
        nnz = max(1, round(d * n * n))
        idx = [random_indices(p, nnz) for p in perms]
        idx64 = [i.long() for i in idx]
        idx2d = [torch.stack([i // n, i % n]).to(torch.int) for i in idx64]  # PEFT's shira_indices
        base = [w.view(-1)[i].clone() for w, i in zip(weights, idx64, strict=True)]
        delta = [torch.randn(nnz, generator=g).mul_(0.01).to(device) for _ in range(layers)]
        lines = sum(lines_touched(i, weights[0].element_size(), line) for i in idx)
        must = layers * nnz * (4 + 2 * weights[0].element_size()) + 2 * lines * line

        def ours(idx=idx, base=base, delta=delta):
            scatter_weights_(weights, idx, base, delta, 1.0)

        def index_copy(idx64=idx64, base=base, delta=delta):
            for w, i, b, dl in zip(weights, idx64, base, delta, strict=True):
                w.view(-1).index_copy_(0, i, b + dl)

        def index_put(idx=idx, base=base, delta=delta):
            for w, i, b, dl in zip(weights, idx, base, delta, strict=True):
                w.view(-1).index_put_((i,), b + dl)

        def peft_merge(idx2d=idx2d, delta=delta):
            peft_shira_merge(weights, idx2d, delta)

        ours()
        expect = [w.view(-1)[i].clone() for w, i in zip(weights, idx64, strict=True)]
        index_put()
        exact = all(torch.equal(w.view(-1)[i], e) for w, i, e in zip(weights, idx64, expect, strict=True))
        label = ("shira_fx scatter_weights_ (Triton scatter_fused_, 1 launch)" if device.type == "cuda"
                 else f"shira_fx scatter_weights_ (index_copy_ on {torch.get_num_threads()} threads)")
        with torch.no_grad():
            for method, fn in ((label, ours), ("index_copy_ loop (int64 idx)", index_copy),
                               ("index_put_ loop (int32 idx)", index_put),
                               ("PEFT SHiRA merge (W += sparse_coo)", peft_merge)):
                ms = median_ms(fn, repeat, warmup=1, device=device)
                gbs = must / (ms / 1e3) / 1e9
                rows.append({"op": "scatter", "size": n, "layers": layers, "density": d,
                             "nnz": layers * nnz, "method": method, "median_ms": ms, "bytes": must,
                             "lines": lines, "GB_per_s": gbs, "x_copy_bandwidth": gbs * 1e9 / bandwidth,
                             "matches_index_put": exact})
        ours()  # leave the weights as base + delta: PEFT's merges accumulated into them
        ours_ms = rows[-4]["median_ms"]
        for r in rows[-4:]:
            r["vs_shira_fx"] = r["median_ms"] / ours_ms
    return rows


def print_tables(result: dict) -> None:
    args = result["args"]
    bw = result["copy_bandwidth_GB_per_s"]
    print(f"\nKernels on {describe(result['machine'])}; {args['dtype']}; copy bandwidth "
          f"{bw:.1f} GB/s (read + write of {args['copy_mib']} MiB)\n")
    print(f"Masked gradient (SDDMM), T = {args['tokens']} tokens, N x N weight:\n")
    rows = [[f"{r['size']}", f"{r['density'] * 100:g} %", f"{r['nnz']:,}", r["method"],
             fmt(r["median_ms"], ".3f"), fmt(r["GB_per_s"], ".1f"), fmt(r["x_copy_bandwidth"], ".2f"),
             fmt(r["GFLOP_per_s"], ".1f"), fmt(r["vs_dense"], ".3f")]
            for r in result["rows"] if r["op"] == "sddmm"]
    print(markdown_table(["N", "density", "nnz", "method", "median ms", "GB/s", "x copy",
                          "GFLOP/s", "vs dense"], rows, align="rrrlrrrrr"))
    print(f"\nScatter W.flat[idx] = base + delta over {args['layers']} weights of N x N:\n")
    rows = [[f"{r['size']}", f"{r['density'] * 100:g} %", f"{r['nnz']:,}", r["method"],
             fmt(r["median_ms"], ".3f"), fmt(r["bytes"] / 1e6, ".1f"), fmt(r["GB_per_s"], ".1f"),
             fmt(r["x_copy_bandwidth"], ".2f"), fmt(r["vs_shira_fx"], ".2f")]
            for r in result["rows"] if r["op"] == "scatter"]
    print(markdown_table(["N", "density", "nnz (all layers)", "method", "median ms", "MB moved",
                          "GB/s", "x copy", "vs shira_fx"], rows, align="rrrlrrrrr"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-size", type=int, default=None, help="largest N (default 4096 on CPU, 8192 on CUDA)")
    p.add_argument("--min-size", type=int, default=1024)
    p.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    p.add_argument("--tokens", type=int, default=None, help="T for SDDMM (default 1024 on CPU, 2048 on CUDA)")
    p.add_argument("--layers", type=int, default=4, help="weights per scatter call")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeat", type=int, default=7, help="timed calls per point on CPU")
    p.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth buffer size")
    p.add_argument("--ops", default="sddmm,scatter")
    p.add_argument("--json", default=None, help=f"default {default_json('kernels')} (none with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repetitions")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    # PEFT's sparse_coo_tensor warns once about skipped invariant checks; PEFT users see it too
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    cuda = device.type == "cuda"
    if args.smoke:
        args.min_size, args.max_size, args.tokens, args.repeat = 64, 128, 32, 2
        args.densities, args.layers, args.copy_mib = "0.01,0.05", 2, args.copy_mib or 16
    args.max_size = args.max_size or (8192 if cuda else 4096)
    args.tokens = args.tokens or (2048 if cuda else 1024)
    args.copy_mib = args.copy_mib or (1024 if cuda else 256)
    if args.json is None and not args.smoke:
        args.json = default_json("kernels")
    dtype = getattr(torch, args.dtype)
    densities = [float(d) for d in args.densities.split(",")]
    sizes, n = [], args.min_size
    while n <= args.max_size:
        sizes.append(n)
        n *= 2
    t0 = time.perf_counter()
    bandwidth = copy_bandwidth(device, args.copy_mib, repeat=2 if args.smoke else 10)
    rows: list[dict] = []
    ops = args.ops.split(",")
    for n in sizes:
        if "sddmm" in ops:
            rows += sddmm_rows(n, densities, args.tokens, dtype, device, args.repeat, bandwidth)
        if "scatter" in ops:
            rows += scatter_rows(n, args.layers, densities, dtype, device, args.repeat, bandwidth)
        print(f"N={n} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    result = {"bench": "kernels", "machine": machine(device), "args": vars(args),
              "device": str(device), "copy_bandwidth_GB_per_s": bandwidth / 1e9, "rows": rows,
              "seconds": time.perf_counter() - t0}
    print_tables(result)
    print()
    for op, key, what in (("sddmm", "vs_dense", "the dense alternative"),
                          ("scatter", "vs_shira_fx", "shira_fx")):
        ours = [r for r in rows if r["op"] == op and r["method"].startswith("shira_fx")]
        if not ours:
            continue
        span = lambda xs: f"{min(xs):.3f}-{max(xs):.3f}x"  # noqa: B023
        if op == "sddmm":
            print(f"SDDMM: shira_fx takes {span([r[key] for r in ours])} the time of {what}")
        else:
            peft_rows = [r for r in rows if r["op"] == op and r["method"].startswith("PEFT")]
            print(f"scatter: shira_fx takes {span([1 / r[key] for r in peft_rows])} PEFT SHiRA's merge "
                  f"time and runs at {span([r['x_copy_bandwidth'] for r in ours])} copy bandwidth")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
