"""The masked gradient by structure: a plan per mask, built once from its indices, and one
dispatcher over every SDDMM path.

A plan splits a mask into dense rows and dense columns of the stored (nrows, ncols) matrix
(struct masks' rows, or columns on a transposed layout; computed as GEMMs over just those
rows or columns) and the remaining elements, put in tile order: CPU_TILE×CPU_TILE blocks,
and TILE×TILE blocks inside them, so that both the CPU row-dot (which wants the rows one
block touches to stay in cache) and the GPU tile kernel (which wants each tile's elements
together) find what they need. `masked_grad` computes each part by the fastest exact path
for its shape and device (a cost model, below) and gathers the parts back into the sorted
order of the indices.
"""

import math

import torch
from torch import Tensor

from . import sddmm_inductor
from .sddmm import (
    _INTERPRETED,
    TILE,
    check_args,
    dense_block,
    sddmm,
    sddmm_cpu,
    sddmm_tiles,
)

# plan = [rows, cols, rest, perm, tile_ptr, tile_ids]
PLAN_LEN = 6
CPU_TILE = 256
# Without dense rows or columns a mask is planned (put in tile order) only from this size on:
# smaller ones run as fast in sorted order.
MIN_PLANNED_NNZ = 4096

CPU_PATHS = ("inductor_rowdot", "sampled_addmm", "dense_bands", "torch_gather")
TRITON_PATHS = ("triton_gather", "triton_tiles")
PATHS = CPU_PATHS + TRITON_PATHS

# CPU cost model, in elements per second on the 2-thread machine of bench/RESULTS.md; only
# their ratios matter (the path with the smallest estimate wins).
_CPU_ROWDOT_MACS = 6e9  # Inductor row-dot, per masked element and step of T
_CPU_SAMPLED_MACS = 1.5e9  # sampled_addmm, the same
_CPU_GEMM_MACS = 4e10  # torch.mm over whole row bands
_CPU_TRANSPOSE = 1e9  # elements of a and b transposed into chunk buffers
_TINY_WORK = 1 << 18  # masked elements x T below which plain gathers win (and nothing compiles)
# CUDA cost model: tile kernel FLOP/s by dot dtype, gather-dot bytes/s of strided gathers.
_GPU_TILE_FLOPS = {torch.float32: 2e13, torch.bfloat16: 3e14, torch.float16: 3e14}
_GPU_GATHER_BYTES = 1e12
_UPCAST_CHUNK = 128


def _check_indices(name: str, indices: Tensor, nrows: int, ncols: int) -> None:
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name}: expected 1-D int32 or int64 indices, "
            f"found shape {tuple(indices.shape)} dtype {indices.dtype}"
        )
    if nrows < 1 or ncols < 1:
        raise ValueError(f"{name}: expected nrows, ncols >= 1, found {nrows}, {ncols}")
    if indices.numel() == 0:
        return
    idx = indices.long()
    if not bool(torch.all(idx[1:] > idx[:-1])):
        raise ValueError(f"{name}: indices must be sorted and unique")
    lo, hi = int(idx[0]), int(idx[-1])
    if lo < 0 or hi >= nrows * ncols:
        raise ValueError(
            f"{name}: indices must lie in [0, {nrows * ncols}) for a ({nrows}, {ncols}) matrix, "
            f"found [{lo}, {hi}]"
        )


def _fill_count(min_fill: float, n: int) -> int:
    """Elements a line of n needs to count as dense (more than n when min_fill > 1: never)."""
    return n + 1 if min_fill > 1 else max(1, math.ceil(min_fill * n))


def plan_mask(
    indices: Tensor, nrows: int, ncols: int, *, min_fill: float = 0.5,
    min_nnz: int = MIN_PLANNED_NNZ,
) -> list[Tensor]:
    """The structure of a sorted unique index set on the (nrows, ncols) matrix as stored, for
    `masked_grad`; `[]` when there is none worth using.

    Returns `[rows, cols, rest, perm, tile_ptr, tile_ids]` on the indices' device:

    - `rows` (int64): rows holding at least `min_fill` of their elements, computed as one GEMM;
    - `cols` (int64): columns holding at least `min_fill` of their elements outside `rows`;
    - `rest` (the indices' dtype): the other flat offsets, CPU_TILE×CPU_TILE block by block and
      TILE×TILE block by block inside those, sorted inside each TILE block;
    - `perm` (int64, nnz): `cat(row_block.flatten(), col_block.flatten(), rest_values)[perm]`
      is the gradient in the order of `indices` (row_block is (len(rows), ncols), col_block
      (nrows, len(cols)));
    - `tile_ptr`, `tile_ids` (int32): `rest[tile_ptr[i]:tile_ptr[i + 1]]` lie in TILE block
      `tile_ids[i]`, numbered row-major.

    A plan without dense rows or columns is made only for at least `min_nnz` elements on a
    matrix larger than one tile (`min_nnz=0`: always; `min_fill > 1`: no dense lines).
    O(nnz + nrows + ncols) time and memory; run it once per mask (it checks that the indices
    are sorted, unique and in range).
    """
    _check_indices("plan_mask", indices, nrows, ncols)
    nnz = indices.shape[0]
    if nnz == 0:
        return []
    idx = indices.long()
    r = idx // ncols
    c = idx - r * ncols
    dense_row = torch.bincount(r, minlength=nrows) >= _fill_count(min_fill, ncols)
    in_row = dense_row[r]
    nr = int(dense_row.sum())
    free_rows = nrows - nr
    col_count = torch.bincount(c[~in_row], minlength=ncols)
    dense_col = col_count >= _fill_count(min_fill, free_rows)
    in_col = dense_col[c] & ~in_row
    nc = int(dense_col.sum())
    rest_sel = ~(in_row | in_col)
    m = int(rest_sel.sum())
    one_tile = nrows <= TILE and ncols <= TILE
    if nr == 0 and nc == 0 and min_nnz > 0 and (m < min_nnz or one_tile):
        return []
    # the rest, block by block
    rr, cc = r[rest_sel], c[rest_sel]
    sub = CPU_TILE // TILE
    key = (rr // CPU_TILE) * math.ceil(ncols / CPU_TILE) + cc // CPU_TILE
    key = key * sub * sub + (rr % CPU_TILE) // TILE * sub + (cc % CPU_TILE) // TILE
    order = torch.sort(key, stable=True).indices
    rest = indices[rest_sel][order]
    # where each element of the sorted mask sits among the concatenated parts
    perm = torch.empty(nnz, dtype=torch.int64, device=idx.device)
    row_rank = torch.cumsum(dense_row, 0) - 1
    col_rank = torch.cumsum(dense_col, 0) - 1
    perm[in_row] = row_rank[r[in_row]] * ncols + c[in_row]
    perm[in_col] = nr * ncols + r[in_col] * nc + col_rank[c[in_col]]
    rank = torch.empty(m, dtype=torch.int64, device=idx.device)
    rank[order] = torch.arange(m, device=idx.device)
    perm[rest_sel] = nr * ncols + nrows * nc + rank
    # the TILE blocks holding rest elements, each one run in `rest`
    tile = (rr[order] // TILE) * math.ceil(ncols / TILE) + cc[order] // TILE
    tile_ids, counts = torch.unique_consecutive(tile, return_counts=True)
    tile_ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return [dense_row.nonzero().view(-1), dense_col.nonzero().view(-1), rest, perm,
            tile_ptr.int(), tile_ids.int()]


def _mm_t(x: Tensor, y: Tensor) -> Tensor:
    """fp32 `x.T @ y` by torch.mm, for (T, I) x and (T, J) y; other dtypes are upcast a chunk
    of T at a time (CPU matmul has no fp32 output for bf16/fp16 inputs)."""
    if x.dtype == torch.float32 and y.dtype == torch.float32:
        return torch.mm(x.t(), y)
    out = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float32, device=x.device)
    for t0 in range(0, x.shape[0], _UPCAST_CHUNK):
        out.addmm_(x[t0 : t0 + _UPCAST_CHUNK].float().t(), y[t0 : t0 + _UPCAST_CHUNK].float())
    return out


def _dense_bands(a: Tensor, b: Tensor, flat: Tensor, ncols: int) -> Tensor:
    """Elements grouped by bands of CPU_TILE rows (sorted or plan order): one GEMM per band
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
    """Plain gathers and one fp32 vecdot, for problems too small for anything else to pay."""
    f = flat.long()
    rows = f // ncols
    return torch.linalg.vecdot(a[:, rows].float(), b[:, f - rows * ncols].float(), dim=0)


def _sampled_addmm(a: Tensor, b: Tensor, flat: Tensor, ncols: int) -> Tensor:
    """`sddmm_cpu` for any order of `flat` (it needs sorted offsets)."""
    if flat.shape[0] < 2 or bool(torch.all(flat[1:] > flat[:-1])):
        return sddmm_cpu(a, b, flat, ncols)
    sorted_flat, order = torch.sort(flat)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=a.device)
    out[order] = sddmm_cpu(a, b, sorted_flat, ncols)
    return out


def choose_path(
    device: str | torch.device, dtype_a: torch.dtype, dtype_b: torch.dtype, T: int, A: int, B: int,
    m: int, n_tiles: int | None,
) -> str:
    """The path the cost model picks for the m remaining elements of a (T, A) by (T, B) masked
    gradient on `device`; `n_tiles` is the number of TILE blocks holding them (None without a
    plan: the Triton tile kernel needs the plan's lists)."""
    if torch.device(device).type == "cuda":
        if n_tiles is None:
            return "triton_gather"
        dot_dtype = torch.promote_types(dtype_a, dtype_b)
        tiles = 2 * n_tiles * TILE * TILE * T / _GPU_TILE_FLOPS[dot_dtype]
        size = torch.finfo(dtype_a).bits // 8 + torch.finfo(dtype_b).bits // 8
        gather = m * T * size / _GPU_GATHER_BYTES
        return "triton_tiles" if tiles < gather else "triton_gather"
    work = m * T
    if work <= _TINY_WORK:
        return "torch_gather"
    bands = min(math.ceil(A / CPU_TILE), m) * CPU_TILE * B * T / _CPU_GEMM_MACS
    rowdot = sddmm_inductor.available()
    sparse = work / (_CPU_ROWDOT_MACS if rowdot else _CPU_SAMPLED_MACS) + T * (A + B) / _CPU_TRANSPOSE
    if bands < sparse:
        return "dense_bands"
    return "inductor_rowdot" if rowdot else "sampled_addmm"


def _remaining(a: Tensor, b: Tensor, flat: Tensor, ncols: int, tiles: tuple[Tensor, Tensor] | None,
               path: str) -> Tensor:
    if path == "triton_gather":
        return sddmm(a, b, flat, ncols)
    if path == "triton_tiles":
        assert tiles is not None
        return sddmm_tiles(a, b, flat, ncols, *tiles)
    if path == "inductor_rowdot":
        return sddmm_inductor.sddmm_rowdot(a, b, flat, ncols)
    if path == "sampled_addmm":
        return _sampled_addmm(a, b, flat, ncols)
    if path == "dense_bands":
        return _dense_bands(a, b, flat, ncols)
    return _torch_gather(a, b, flat, ncols)


def _check_path(path: str | None, a: Tensor) -> None:
    if path is None:
        return
    if path not in PATHS:
        raise ValueError(f"masked_grad: path must be one of {PATHS}, found {path!r}")
    if path in TRITON_PATHS and not a.is_cuda and not _INTERPRETED:
        raise ValueError(f"masked_grad: path {path!r} needs CUDA tensors (or TRITON_INTERPRET=1)")
    if path in CPU_PATHS and a.is_cuda and path not in ("dense_bands", "torch_gather"):
        raise ValueError(f"masked_grad: path {path!r} runs on CPU only, found {a.device}")


def masked_grad(
    a: Tensor, b: Tensor, indices: Tensor, ncols: int, plan: list[Tensor], *, path: str | None = None
) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[indices]` for a (T, A), b (T, B), sorted unique `indices`,
    never forming the A×B product.

    `plan` is `plan_mask(indices, A, ncols)` (or `[]`): dense rows and columns run as GEMMs,
    the rest by the path the cost model picks for the device and shape, unless `path` (one
    of PATHS) says which. Exact for every path: fp32 accumulation, any of fp32/bf16/fp16
    inputs, read through their strides (no transposed copies of a or b).
    """
    check_args("masked_grad", a, b, indices, ncols)
    _check_path(path, a)
    nnz, T = indices.shape[0], a.shape[0]
    if plan and len(plan) != PLAN_LEN:
        raise ValueError(f"masked_grad: a plan holds {PLAN_LEN} tensors (plan_mask), found {len(plan)}")
    if plan and plan[3].shape[0] != nnz:
        raise ValueError(
            f"masked_grad: the plan was made for {plan[3].shape[0]} indices, found {nnz}"
        )
    if nnz == 0 or T == 0:
        return torch.zeros(nnz, dtype=torch.float32, device=a.device)
    if not plan and path == "triton_tiles":  # tile lists, without dense parts
        plan = plan_mask(indices, a.shape[1], ncols, min_fill=2.0, min_nnz=0)
    if plan:
        rows, cols, rest, perm, tile_ptr, tile_ids = plan
        tiles = (tile_ptr, tile_ids)
    else:
        rows = cols = None
        rest, perm, tiles = indices, None, None
    chosen = path or choose_path(a.device, a.dtype, b.dtype, T, a.shape[1], b.shape[1], rest.shape[0],
                                 None if tiles is None else tiles[1].shape[0])
    on_triton = chosen in TRITON_PATHS
    parts = []
    if rows is not None and rows.numel():
        block = dense_block(a, b, rows=rows) if on_triton else _mm_t(a.index_select(1, rows), b)
        parts.append(block.view(-1))
    if cols is not None and cols.numel():
        block = dense_block(a, b, cols=cols) if on_triton else _mm_t(a, b.index_select(1, cols))
        parts.append(block.view(-1))
    if rest.numel():
        parts.append(_remaining(a, b, rest, ncols, tiles, chosen))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out if perm is None else out[perm]
