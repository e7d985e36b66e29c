"""The masked gradient's dispatcher, `masked_sddmm`: fp32 `(a.T @ b).view(-1)[indices]` by the
mask's structure (`structure.mask_structure`: dense rows and columns as GEMMs, diagonals
streamed) and, for the rest, the fastest exact SDDMM path for the device and shape, picked by a
cost model (`choose_path`, its estimates `path_costs`, in words for `explain`: `describe`),
unless the caller names one. The CPU paths that are plain torch live here; the C++ and Triton
kernels in their own files.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import sddmm_cpp
from .sddmm import (
    _INTERPRETED,
    TILE,
    check_args,
    dense_block,
    sddmm,
    sddmm_cpu,
    sddmm_tiles,
)
from .structure import CPU_TILE, STRUCTURE_FIELDS, mask_structure

CPU_PATHS = ("cpp_rowdot", "sampled_addmm", "dense_bands", "torch_gather")
TRITON_PATHS = ("triton_gather", "triton_tiles")
PATHS = CPU_PATHS + TRITON_PATHS

# CPU cost model: rates of one thread, measured side by side with `python -m bench.kernel_ops
# --ops paths` (bench/RESULTS.md); the path with the smallest estimate wins, so only their
# ratios matter. Threads divide every path's time alike, except that each thread of the C++
# row-dot transposes the columns of b its elements read (all of them, for a random mask).
_CPU_DOT_MACS = 1.6e10  # C++ row-dot: multiply-adds per second over transposed chunks
_CPU_TRANSPOSE = 1.4e9  # elements of a and b transposed into the row-dot's chunks, per second
_CPU_SAMPLED_MACS = 5.7e9  # sampled_addmm (the fallback without the C++ kernels)
_CPU_SAMPLED_COPY = 7e8  # elements of a and b it copies into whole transposes, per second
_CPU_GEMM_MACS = 4e10  # torch.mm over whole row bands
_CPU_GATHER = 1.2e9  # elements gathered from columns of a and b by index_select
_CPU_CALL = 1e-5  # seconds per torch op a path runs, beyond its arithmetic
# CUDA cost model, not yet calibrated on a GPU (bench/gpu.py measures every path and reports
# where this pick was not the fastest): tile-kernel FLOP/s by dot dtype (fp32: IEEE, no tensor
# cores), gather-dot bytes/s of gathered reads.
_GPU_TILE_FLOPS = {torch.float32: 2e13, torch.bfloat16: 3e14, torch.float16: 3e14}
_GPU_GATHER_BYTES = 1e12
_UPCAST_CHUNK = 128
# elements of the temporaries a streamed part (diagonals, gathers) holds at a time
_STREAM_ELEMS = 1 << 18


def _diagonals(a: Tensor, b: Tensor, diag: Tensor, ncols: int) -> Tensor:
    """fp32 values at the structure's `diag` offsets (whole diagonals, one after another): per
    diagonal c = r + delta, `sum_t a[t, r0:r1] * b[t, r0 + delta:r1 + delta]`, streamed over T
    in chunks whose products stay small; no gathers, no transposes."""
    f = diag.long().cpu()
    r = f // ncols
    deltas, lengths = torch.unique_consecutive(f - r * ncols - r, return_counts=True)
    parts, start = [], 0
    for d, n in zip(deltas.tolist(), lengths.tolist(), strict=True):
        r0 = int(r[start])
        x, y = a[:, r0 : r0 + n], b[:, r0 + d : r0 + d + n]
        acc = torch.zeros(n, dtype=torch.float32, device=a.device)
        step = max(1, _STREAM_ELEMS // n)
        for t0 in range(0, a.shape[0], step):
            acc += torch.linalg.vecdot(x[t0 : t0 + step].float(), y[t0 : t0 + step].float(), dim=0)
        parts.append(acc)
        start += n
    return torch.cat(parts)


def _mm_t(x: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
    """fp32 `x.T @ y` by torch.mm, for (T, I) x and (T, J) y, into `out` if given; other dtypes
    are upcast a chunk of T at a time (CPU matmul has no fp32 output for bf16/fp16 inputs)."""
    if x.dtype == torch.float32 and y.dtype == torch.float32:
        return torch.mm(x.t(), y, out=out)
    if out is None:
        out = torch.empty(x.shape[1], y.shape[1], dtype=torch.float32, device=x.device)
    out.zero_()
    for t0 in range(0, x.shape[0], _UPCAST_CHUNK):
        out.addmm_(x[t0 : t0 + _UPCAST_CHUNK].float().t(), y[t0 : t0 + _UPCAST_CHUNK].float())
    return out


def _dense_bands(a: Tensor, b: Tensor, flat: Tensor, ncols: int) -> Tensor:
    """Elements grouped by bands of CPU_TILE rows (sorted or structure order): one GEMM per band
    that holds any, `a[:, band].T @ b`, then the band's elements picked out of it. Exact and
    fast for dense masks; memory O(CPU_TILE * ncols), never the whole product."""
    f = flat.long()
    band_ids, counts = torch.unique_consecutive(f // (CPU_TILE * ncols), return_counts=True)
    out = torch.empty(f.shape[0], dtype=torch.float32, device=a.device)
    start = 0
    for band, n in zip(band_ids.tolist(), counts.tolist(), strict=True):
        r0 = band * CPU_TILE
        block = _mm_t(a[:, r0 : r0 + CPU_TILE], b)
        out[start : start + n] = block.view(-1)[f[start : start + n] - r0 * ncols]
        start += n
    return out


def _torch_gather(a: Tensor, b: Tensor, flat: Tensor, ncols: int) -> Tensor:
    """Plain gathers and fp32 vecdots, a block of elements at a time (bounded temporaries): for
    problems too small, or elements too few, for transposing a and b to pay."""
    f = flat.long()
    rows = f // ncols
    cols = f - rows * ncols
    out = torch.empty(f.shape[0], dtype=torch.float32, device=a.device)
    step = max(1, _STREAM_ELEMS // max(1, a.shape[0]))
    for s in range(0, f.shape[0], step):
        x = a.index_select(1, rows[s : s + step]).float()
        y = b.index_select(1, cols[s : s + step]).float()
        out[s : s + step] = torch.linalg.vecdot(x, y, dim=0)
    return out


def _sampled_addmm(a: Tensor, b: Tensor, flat: Tensor, ncols: int) -> Tensor:
    """`sddmm_cpu` for any order of `flat` (it needs sorted offsets)."""
    if flat.shape[0] < 2 or bool(torch.all(flat[1:] > flat[:-1])):
        return sddmm_cpu(a, b, flat, ncols)
    sorted_flat, order = torch.sort(flat)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=a.device)
    out[order] = sddmm_cpu(a, b, sorted_flat, ncols)
    return out


def path_costs(
    device: str | torch.device, dtype_a: torch.dtype, dtype_b: torch.dtype, T: int, A: int, B: int,
    m: int, n_tiles: int | None, threads: int | None = None,
) -> dict[str, float]:
    """Estimated seconds of each path the device offers for the m remaining elements of a (T, A) by
    (T, B) masked gradient; `n_tiles` is the number of TILE blocks holding them (None without a
    structure: the Triton tile kernel needs its tile lists), `threads` the CPU threads (torch's)."""
    if torch.device(device).type == "cuda":
        size = torch.finfo(dtype_a).bits // 8 + torch.finfo(dtype_b).bits // 8
        costs = {"triton_gather": m * T * size / _GPU_GATHER_BYTES}
        if n_tiles is not None:
            dot_dtype = torch.promote_types(dtype_a, dtype_b)
            rate = _GPU_TILE_FLOPS.get(dot_dtype, _GPU_TILE_FLOPS[torch.float32])
            costs["triton_tiles"] = 2 * n_tiles * TILE * TILE * T / rate
        return costs
    work = m * T
    nt = max(1, torch.get_num_threads() if threads is None else threads)
    nt_dot = sddmm_cpp.threads_for(work, nt)
    costs = {
        "torch_gather": 2 * work / _CPU_GATHER + 4 * _CPU_CALL * math.ceil(work / _STREAM_ELEMS),
        "dense_bands": (min(math.ceil(A / CPU_TILE), m) * CPU_TILE * B * T / _CPU_GEMM_MACS / nt
                        + 3 * _CPU_CALL * min(math.ceil(A / CPU_TILE), m)),
    }
    if sddmm_cpp.available():
        # each thread transposes its share of a's columns and every column of b its elements read
        transposed = T * (A / nt_dot + B) if nt_dot > 1 else T * (A + B)
        costs["cpp_rowdot"] = transposed / _CPU_TRANSPOSE + work / _CPU_DOT_MACS / nt_dot + _CPU_CALL
    else:
        costs["sampled_addmm"] = ((work / _CPU_SAMPLED_MACS + T * (A + B) / _CPU_SAMPLED_COPY) / nt
                                  + 4 * _CPU_CALL)
    return costs


def choose_path(
    device: str | torch.device, dtype_a: torch.dtype, dtype_b: torch.dtype, T: int, A: int, B: int,
    m: int, n_tiles: int | None, threads: int | None = None,
) -> str:
    """The path the cost model picks for the m remaining elements of a (T, A) by (T, B) masked
    gradient on `device`: the cheapest of `path_costs`."""
    costs = path_costs(device, dtype_a, dtype_b, T, A, B, m, n_tiles, threads)
    return min(costs, key=costs.get)


_PERM = STRUCTURE_FIELDS.index("perm")


def _has_structure(structure: list[Tensor]) -> bool:
    """False for [] and for no_structure()'s empty tensors (a layer without a structure)."""
    return bool(structure) and structure[_PERM].numel() > 0


def _parts(structure: list[Tensor], nnz: int) -> dict[str, int]:
    """Elements per part of a structure ([] or no_structure's: all of them are the rest)."""
    if not _has_structure(structure):
        return {"rows": 0, "cols": 0, "diag": 0, "rest": nnz, "tiles": -1}
    f = dict(zip(STRUCTURE_FIELDS, structure, strict=True))
    return {"rows": f["rows"].numel(), "cols": f["cols"].numel(), "diag": f["diag"].numel(),
            "rest": f["rest"].numel(), "tiles": f["tile_ids"].numel()}


def describe(device: str | torch.device, dtype_a: torch.dtype, dtype_b: torch.dtype, T: int, A: int,
             B: int, nnz: int, structure: list[Tensor], threads: int | None = None) -> str:
    """In words, how `masked_sddmm` computes this layer's gradient and why: the structure's parts,
    the path its cost model picks for the rest and every path's estimate."""
    p = _parts(structure, nnz)
    done = []
    if p["rows"]:
        done.append(f"{p['rows']} dense row(s) as one GEMM")
    if p["cols"]:
        done.append(f"{p['cols']} dense column(s) as one GEMM")
    if p["diag"]:
        done.append(f"{p['diag']:,} diagonal element(s) streamed")
    m = p["rest"]
    if m:
        n_tiles = None if p["tiles"] < 0 else p["tiles"]
        costs = path_costs(device, dtype_a, dtype_b, T, A, B, m, n_tiles, threads)
        chosen = min(costs, key=costs.get)  # choose_path's pick
        est = ", ".join(f"{k} {v * 1e3:.2g}" for k, v in sorted(costs.items(), key=lambda kv: kv[1]))
        done.append(f"{m:,} other element(s) by {chosen}, the cheapest estimate (ms: {est})")
    return (f"masked gradient at T={T} of ({A}, {B}): " + "; ".join(done)) if done else \
        f"masked gradient at T={T} of ({A}, {B}): no elements"


def _remaining(a: Tensor, b: Tensor, flat: Tensor, ncols: int, tiles: tuple[Tensor, Tensor] | None,
               path: str) -> Tensor:
    if path == "triton_gather":
        return sddmm(a, b, flat, ncols)
    if path == "triton_tiles":
        assert tiles is not None
        return sddmm_tiles(a, b, flat, ncols, *tiles)
    if path == "cpp_rowdot":
        return sddmm_cpp.sddmm_rowdot(a, b, flat, ncols)
    if path == "sampled_addmm":
        return _sampled_addmm(a, b, flat, ncols)
    if path == "dense_bands":
        return _dense_bands(a, b, flat, ncols)
    return _torch_gather(a, b, flat, ncols)


def _check_path(path: str | None, a: Tensor) -> None:
    if path is None:
        return
    if path not in PATHS:
        raise ValueError(f"masked_sddmm: path must be one of {PATHS}, found {path!r}")
    if path in TRITON_PATHS and not a.is_cuda and not _INTERPRETED:
        raise ValueError(f"masked_sddmm: path {path!r} needs CUDA tensors (or TRITON_INTERPRET=1)")
    if path in CPU_PATHS and a.is_cuda and path not in ("dense_bands", "torch_gather"):
        raise ValueError(f"masked_sddmm: path {path!r} runs on CPU only, found {a.device}")


def masked_sddmm(
    a: Tensor, b: Tensor, indices: Tensor, ncols: int, structure: list[Tensor], *, path: str | None = None
) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[indices]` for a (T, A), b (T, B), sorted unique `indices`,
    never forming the A×B product: the kernel dispatcher of the `shira_fx::masked_grad` op.

    `structure` is `mask_structure(indices, A, ncols)` (or `[]`): dense rows and columns run as
    GEMMs, diagonals streamed, the rest by the path the cost model picks for the device and
    shape, unless `path` (one of PATHS) says which. Exact for every path: fp32 accumulation, any
    of fp32/bf16/fp16 inputs, read through their strides (no transposed copies of a or b).
    """
    check_args("masked_sddmm", a, b, indices, ncols)
    _check_path(path, a)
    nnz, T = indices.shape[0], a.shape[0]
    if structure and len(structure) != len(STRUCTURE_FIELDS):
        raise ValueError(f"masked_sddmm: a structure holds {len(STRUCTURE_FIELDS)} tensors "
                         f"{STRUCTURE_FIELDS} (mask_structure), found {len(structure)}")
    if not _has_structure(structure):
        structure = []  # no_structure(): a layer without one, kept the same arity as its neighbours
    made_for = structure[_PERM].shape[0] if structure else nnz
    if made_for != nnz:
        raise ValueError(f"masked_sddmm: the structure was made for {made_for} indices, found {nnz}")
    if nnz == 0 or T == 0:
        return torch.zeros(nnz, dtype=torch.float32, device=a.device)
    if not structure and path == "triton_tiles":  # tile lists, without dense parts
        structure = mask_structure(indices, a.shape[1], ncols, min_fill=2.0, min_nnz=0)
    if not structure:
        chosen = path or choose_path(a.device, a.dtype, b.dtype, T, a.shape[1], ncols, nnz, None)
        return _remaining(a, b, indices, ncols, None, chosen)
    rows, cols, diag, rest, perm, tile_ptr, tile_ids = structure
    chosen = path or (choose_path(a.device, a.dtype, b.dtype, T, a.shape[1], ncols, rest.shape[0],
                                  tile_ids.shape[0]) if rest.numel() else "")
    if rest.shape[0] == nnz and chosen in CPU_PATHS:
        # nothing but the rest: the CPU paths run as fast in sorted order, which needs no perm
        return _remaining(a, b, indices, ncols, None, chosen)
    on_triton = chosen in TRITON_PATHS
    # every part writes its slice of one buffer, in the order perm reads them (dense lines whole:
    # a line counts as dense from half full on)
    total = rows.numel() * ncols + a.shape[1] * cols.numel() + diag.numel() + rest.numel()
    out = torch.empty(total, dtype=torch.float32, device=a.device)
    start = 0
    if rows.numel():
        n = rows.numel() * ncols
        block = out[start : start + n].view(rows.numel(), ncols)
        if on_triton:
            block.copy_(dense_block(a, b, rows=rows))
        else:
            _mm_t(a.index_select(1, rows), b, out=block)
        start += n
    if cols.numel():
        n = a.shape[1] * cols.numel()
        block = out[start : start + n].view(a.shape[1], cols.numel())
        if on_triton:
            block.copy_(dense_block(a, b, cols=cols))
        else:
            _mm_t(a, b.index_select(1, cols), out=block)
        start += n
    if diag.numel():
        n = diag.numel()
        if on_triton or a.is_cuda:  # coalesced reads for the gather kernel
            out[start : start + n] = sddmm(a, b, diag, ncols)
        elif sddmm_cpp.available():
            out[start : start + n] = sddmm_cpp.sddmm_diagonals(a, b, diag, ncols)
        else:
            out[start : start + n] = _diagonals(a, b, diag, ncols)
        start += n
    if rest.numel():
        out[start:] = _remaining(a, b, rest, ncols, (tile_ptr, tile_ids), chosen)
    return out[perm]
