"""Microbenchmarks of the two kernels SHiRA training and switching stand on, each against what
one would write without them, judged against the machine's copy bandwidth.

(a) Masked gradient (SDDMM): `grad[k] = sum_t grad_y[t, row_k] * x[t, col_k]` for a square
    (N, N) weight, for a random mask (SHiRA-rand), a struct mask (whole rows plus the
    diagonal, SHiRA-struct) and its whole rows alone ("rows"), at each density and each T.
    Side by side, in one run:
    `shira_fx.kernels.masked_sddmm.masked_sddmm` (the dispatcher of the `masked_grad` op) with
    the mask's structure and the path its cost model picks ("auto"), every path forced in turn
    (on CPU: the C++ row-dot, the banded GEMM, plain gathers; on CUDA: the Triton
    gather-dot with and without the structure's tile order, the Triton tile kernel),
    `torch.sparse.sampled_addmm` on the sorted mask (`sddmm_cpu`, the CPU baseline), the dense
    `grad_y.T @ x` + gather, and for struct and rows masks a plain GEMM over just the mask's
    dense rows (`grad_y[:, rows].T @ x`, what the struct path should cost). Timings are
    interleaved (every method once per round, the median over rounds), so a shared machine's
    noise hits every method alike.
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
run. GFLOP/s counts the useful 2 T nnz flops of every method (so the dense product's rate is
its share of useful work). Times: median of `--repeat` interleaved rounds after a warm-up
call on CPU, `triton.testing.do_bench` (median) on CUDA.

    python -m bench.kernel_ops              # N = 512..4096, 3 densities, T = 1024 (CPU)
    python -m bench.kernel_ops --tokens 256,512,1024,2048 --ops sddmm
    python -m bench.kernel_ops --smoke      # tiny shapes, a few seconds
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch

from bench.common import (
    BenchParser,
    bench_result,
    copy_bandwidth,
    describe,
    fmt,
    machine,
    median_ms,
    print_table,
    save,
    sync,
    torch_threads,
)
from shira_fx.kernels.masked_sddmm import choose_path, masked_sddmm
from shira_fx.kernels.sddmm import sddmm_cpu
from shira_fx.kernels.structure import STRUCTURE_FIELDS, mask_structure
from shira_fx.masks import struct_mask
from shira_fx.ops import scatter_weights_

DENSITIES = (0.002, 0.01, 0.03)
MASKS = ("rand", "struct", "rows")
CPU_PATHS = ("cpp_rowdot", "dense_bands", "torch_gather")
CUDA_PATHS = ("triton_gather", "triton_tiles")
# plain gathers hold T x nnz products: skip them beyond this many elements
GATHER_LIMIT = 1 << 24
AUTO = "shira_fx masked_grad"
BASELINE = "sampled_addmm (sddmm_cpu, sorted mask)"
DENSE = "dense grad_y.T @ x + gather"
ROWS_GEMM = "GEMM over the mask's dense rows"


def random_indices(perm: torch.Tensor, nnz: int) -> torch.Tensor:
    """Sorted int32 flat offsets, as a SparseAdapter stores them: the first nnz of a random
    permutation, so the masks of one weight are nested across densities."""
    return perm[:nnz].sort().values.to(torch.int32)


def lines_touched(idx: torch.Tensor, element_size: int, line: int) -> int:
    """Distinct cache lines (or sectors) a scatter at these flat offsets reads and writes."""
    return int(torch.unique(idx.long() * element_size // line).numel())


def mask_indices(kind: str, n: int, nnz: int, perm: torch.Tensor) -> torch.Tensor:
    """The sorted int32 offsets of an about nnz-element mask of this kind on an (n, n) weight:
    random (SHiRA-rand), rows at a stride plus the diagonal (SHiRA-struct, as `build_masks`
    makes it), or just the whole rows at a stride ("rows": struct's dense part alone)."""
    if kind == "rand":
        return random_indices(perm, nnz)
    if kind == "rows":
        rows = torch.arange(0, n, max(1, round(n * n / nnz)), device=perm.device)
        return (rows[:, None] * n + torch.arange(n, device=perm.device)).view(-1).to(torch.int32)
    return struct_mask(n, n, nnz, 0, False).to(perm.device)


def interleaved_ms(fns: dict[str, Callable], rounds: int, device: torch.device,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median ms per method over `rounds` rounds that each call every method once (after one
    warm-up call each); on CUDA, do_bench per method. `clock` may be time.thread_time on one
    thread: the CPU time of this thread, which time slices lost to other processes leave out."""
    if device.type == "cuda":
        return {k: median_ms(f, rounds, device=device) for k, f in fns.items()}
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, rounds)):
        for k, f in fns.items():
            sync(device)
            t0 = clock()
            f()
            sync(device)
            times[k].append(clock() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def sddmm_methods(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, n: int, structure: list[torch.Tensor],
                  kind: str, device: torch.device) -> dict[str, tuple[Callable, str]]:
    """name -> (call, path): masked_sddmm as chosen and on every path, and the alternatives."""
    T = a.shape[0]
    parts = dict(zip(STRUCTURE_FIELDS, structure, strict=True)) if structure else {}
    m = parts["rest"].shape[0] if structure else idx.shape[0]
    chosen = choose_path(device, a.dtype, b.dtype, T, n, n, m,
                         parts["tile_ids"].shape[0] if structure else None)
    # with nothing left beside dense lines and diagonals, no path is chosen
    chosen = chosen if m else "dense parts only"
    methods: dict[str, tuple[Callable, str]] = {
        f"{AUTO} (auto: {chosen})": (lambda: masked_sddmm(a, b, idx, n, structure), chosen)}
    for path in CUDA_PATHS if device.type == "cuda" else CPU_PATHS:
        if path == "torch_gather" and m * T > GATHER_LIMIT:
            continue
        call = lambda path=path: masked_sddmm(a, b, idx, n, structure, path=path)  # noqa: E731
        methods[f"{AUTO} (path {path})"] = (call, path)
    if device.type == "cuda":  # (the label's "plan" is the structure: kept, results compare by it)
        methods[f"{AUTO} (path triton_gather, no plan)"] = (
            lambda: masked_sddmm(a, b, idx, n, [], path="triton_gather"), "triton_gather")
    else:
        methods[BASELINE] = (lambda: sddmm_cpu(a, b, idx, n), "sampled_addmm")
    idx64 = idx.long()
    methods[DENSE] = (lambda: (a.t() @ b).float().view(-1).index_select(0, idx64), "dense")
    if kind in ("struct", "rows") and structure and parts["rows"].numel():
        rows = parts["rows"]
        methods[ROWS_GEMM] = (lambda: a.index_select(1, rows).t() @ b, "gemm")
    return methods


def sddmm_rows(n: int, densities: list[float], tokens: list[int], masks: list[str], dtype: torch.dtype,
               device: torch.device, repeat: int, bandwidth: float,
               clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """Time every masked-gradient method for one N at each mask kind, density and T."""
    g = torch.Generator(device="cpu").manual_seed(n)
    perm = torch.randperm(n * n, generator=g).to(device)
    rows = []
    for T in tokens:
        grad_y = torch.randn(T, n, generator=g, dtype=dtype).to(device)
        x = torch.randn(T, n, generator=g, dtype=dtype).to(device)
        dense_ref = (grad_y.float().t() @ x.float()).view(-1)
        for kind in masks:
            for d in densities:
                idx = mask_indices(kind, n, max(1, round(d * n * n)), perm)
                nnz = idx.shape[0]
                structure = mask_structure(idx, n, n)
                dense_rows = structure[STRUCTURE_FIELDS.index("rows")] if structure else idx[:0]
                methods = sddmm_methods(grad_y, x, idx, n, structure, kind, device)
                ref = dense_ref[idx.long()]
                scale = ref.abs().max().item() or 1.0
                errs = {}
                for name, (fn, _) in methods.items():
                    out = fn().reshape(-1)
                    want = ref if out.numel() == ref.numel() else (
                        dense_ref.view(n, n)[dense_rows].reshape(-1))  # the rows GEMM
                    errs[name] = (out.float() - want).abs().max().item() / scale
                ms = interleaved_ms({k: f for k, (f, _) in methods.items()}, repeat, device, clock)
                must = T * 2 * n * grad_y.element_size() + nnz * 4 + nnz * 4
                dense_ms = ms[DENSE]
                base_ms = ms.get(BASELINE)
                for name, (_, path) in methods.items():
                    t = ms[name]
                    rows.append({
                        "op": "sddmm", "size": n, "mask": kind, "density": d, "nnz": nnz, "tokens": T,
                        "method": name, "path": path, "median_ms": t, "bytes": must,
                        "GB_per_s": must / (t / 1e3) / 1e9, "x_copy_bandwidth": must / (t / 1e3) / bandwidth,
                        "GFLOP_per_s": 2 * T * nnz / (t / 1e3) / 1e9, "max_rel_err": errs[name],
                        "vs_dense": t / dense_ms,
                        "speedup_vs_sampled_addmm": None if base_ms is None else base_ms / t,
                        "dense_rows": int(dense_rows.numel()),
                        "vs_rows_gemm": t / ms[ROWS_GEMM] if ROWS_GEMM in ms else None,
                    })
                print(f"  N={n} T={T} {kind} {d * 100:g} %: "
                      + ", ".join(f"{r['path']} {r['median_ms']:.1f}" for r in rows[-len(methods):]),
                      file=sys.stderr)
    return rows


def sddmm_targets(rows: list[dict]) -> list[str]:
    """The issue's CPU targets, evaluated on the rows: the chosen path at >= 1.5x sampled_addmm's
    throughput on random 1-3 % masks of 1024^2..4096^2, and struct masks within 1.2x of a GEMM
    over their dense rows."""
    out = []
    auto = [r for r in rows if r["op"] == "sddmm" and r["method"].startswith(f"{AUTO} (auto")]
    fast = [r for r in auto if r["mask"] == "rand" and 0.01 <= r["density"] <= 0.03
            and 1024 <= r["size"] <= 4096 and r["speedup_vs_sampled_addmm"] is not None]
    if fast:
        worst = min(fast, key=lambda r: r["speedup_vs_sampled_addmm"])
        ok = worst["speedup_vs_sampled_addmm"] >= 1.5
        out.append(f"{'pass' if ok else 'MISS'}: chosen CPU path vs sampled_addmm on random 1-3 % masks, "
                   f"N 1024-4096: {min(r['speedup_vs_sampled_addmm'] for r in fast):.2f}-"
                   f"{max(r['speedup_vs_sampled_addmm'] for r in fast):.2f}x throughput (target >= 1.5x; "
                   f"worst N={worst['size']} {worst['density'] * 100:g} % T={worst['tokens']})")
    for kind, what in (("rows", "the structure's dense rows (whole-row masks)"),
                       ("struct", "struct masks (dense rows + diagonal + a partial row)")):
        struct = [r for r in auto if r["mask"] == kind and r["vs_rows_gemm"] is not None]
        if struct:
            worst = max(struct, key=lambda r: r["vs_rows_gemm"])
            ok = worst["vs_rows_gemm"] <= 1.2
            out.append(f"{'pass' if ok else 'MISS'}: {what} vs a plain GEMM over the same rows: "
                       f"{min(r['vs_rows_gemm'] for r in struct):.2f}-{worst['vs_rows_gemm']:.2f}x the time "
                       f"(target <= 1.2x; worst N={worst['size']} {worst['density'] * 100:g} % "
                       f"T={worst['tokens']})")
    return out


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
    sd = [r for r in result["rows"] if r["op"] == "sddmm"]
    if sd:
        print("Masked gradient (SDDMM), N x N weight, T tokens; x sa = sampled_addmm's time / this "
              "method's time:\n")
        rows = [[f"{r['size']}", r["mask"], f"{r['density'] * 100:g} %", f"{r['nnz']:,}", f"{r['tokens']}",
                 r["method"], fmt(r["median_ms"], ".2f"), fmt(r["GFLOP_per_s"], ".2f"),
                 fmt(r["speedup_vs_sampled_addmm"], ".2f"), fmt(r["vs_dense"], ".3f"),
                 fmt(r["vs_rows_gemm"], ".2f"), f"{r['max_rel_err']:.1e}"] for r in sd]
        print_table(None, ["N", "mask", "density", "nnz", "T", "method", "median ms", "GFLOP/s",
                           "x sa", "vs dense", "vs rows GEMM", "max rel err"], rows, align="rlrrrlrrrrrr")
    sc = [r for r in result["rows"] if r["op"] == "scatter"]
    if sc:
        rows = [[f"{r['size']}", f"{r['density'] * 100:g} %", f"{r['nnz']:,}", r["method"],
                 fmt(r["median_ms"], ".3f"), fmt(r["bytes"] / 1e6, ".1f"), fmt(r["GB_per_s"], ".1f"),
                 fmt(r["x_copy_bandwidth"], ".2f"), fmt(r["vs_shira_fx"], ".2f")] for r in sc]
        print_table(f"Scatter W.flat[idx] = base + delta over {args['layers']} weights of N x N:",
                    ["N", "density", "nnz (all layers)", "method", "median ms", "MB moved",
                     "GB/s", "x copy", "vs shira_fx"], rows, align="rrrlrrrrr")


def main(argv: list[str] | None = None) -> dict:
    p = BenchParser("kernel_ops", __doc__, smoke="tiny shapes, 2 repetitions")
    p.add_device()
    p.add_argument("--max-size", type=int, default=None, help="largest N (default 4096 on CPU, 8192 on CUDA)")
    p.add_argument("--min-size", type=int, default=512)
    p.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    p.add_argument("--masks", default=",".join(MASKS), help="SDDMM mask kinds: rand, struct, rows")
    p.add_argument("--tokens", default=None, help="T values for SDDMM, comma-separated (default 1024 "
                   "on CPU, 2048 on CUDA)")
    p.add_argument("--layers", type=int, default=4, help="weights per scatter call")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_threads("torch CPU threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=7, help="timed rounds per point on CPU")
    p.add_argument("--timer", default="wall", choices=["wall", "thread"],
                   help="CPU SDDMM clock: wall time, or this thread's CPU time (needs --threads 1; "
                   "immune to time slices other processes take)")
    p.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth buffer size")
    p.add_argument("--ops", default="sddmm,scatter")
    args = p.parse(argv, smoke=dict(min_size=64, max_size=128, tokens="32", repeat=2, densities="0.01,0.05",
                                    layers=2))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.smoke:
        args.copy_mib = args.copy_mib or 16
    args.max_size = args.max_size or (8192 if cuda else 4096)
    args.tokens = args.tokens or ("2048" if cuda else "1024")
    args.copy_mib = args.copy_mib or (1024 if cuda else 256)
    with torch_threads(args.threads):
        if args.timer == "thread" and (device.type != "cpu" or torch.get_num_threads() != 1):
            p.error("--timer thread measures one CPU thread: use it with --threads 1 on CPU")
        # PEFT's sparse_coo_tensor warns once about skipped invariant checks; PEFT users see it too
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        return save(args, measure(args, device))


def measure(args, device: torch.device) -> dict:
    """Every point of every op at each size; the tables and target lines printed."""
    clock = time.thread_time if args.timer == "thread" else time.perf_counter
    dtype = getattr(torch, args.dtype)
    densities = [float(d) for d in args.densities.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
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
            rows += sddmm_rows(n, densities, tokens, args.masks.split(","), dtype, device, args.repeat,
                               bandwidth, clock)
        if "scatter" in ops and (n >= 1024 or args.smoke):
            rows += scatter_rows(n, args.layers, densities, dtype, device, args.repeat, bandwidth)
        print(f"N={n} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    targets = sddmm_targets(rows)
    result = bench_result("kernel_ops", machine(device), args, device=str(device),
                          copy_bandwidth_GB_per_s=bandwidth / 1e9, rows=rows, targets=targets,
                          seconds=time.perf_counter() - t0)
    print_tables(result)
    print()
    for line in targets:
        print(line)
    sc = [r for r in rows if r["op"] == "scatter"]
    if sc:
        span = lambda xs: f"{min(xs):.3f}-{max(xs):.3f}x"  # noqa: E731
        ours = [r for r in sc if r["method"].startswith("shira_fx")]
        peft_rows = [r for r in sc if r["method"].startswith("PEFT")]
        print(f"scatter: shira_fx takes {span([1 / r['vs_shira_fx'] for r in peft_rows])} PEFT SHiRA's "
              f"merge time and runs at {span([r['x_copy_bandwidth'] for r in ours])} copy bandwidth")
    return result


if __name__ == "__main__":
    main()
