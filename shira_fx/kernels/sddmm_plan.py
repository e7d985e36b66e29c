"""The masked gradient by structure: a plan per mask, built once from its indices, and one
dispatcher over every SDDMM path.

A plan splits a mask into dense rows and dense columns of the stored (nrows, ncols) matrix
(struct masks' rows, or columns on a transposed layout; computed as GEMMs over just those
rows or columns), dense diagonals (struct's; column-wise dots of two column slices) and the
remaining elements, put in tile order: CPU_TILE×CPU_TILE blocks, and TILE×TILE blocks inside
them, so that both the CPU row-dot (which wants the rows one block touches to stay in cache)
and the GPU tile kernel (which wants each tile's elements together) find what they need.
`masked_grad` computes each part by the fastest exact path for its shape and device (a cost
model, below) and gathers the parts back into the sorted order of the indices.
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

PLAN_FIELDS = ("rows", "cols", "diag", "rest", "perm", "tile_ptr", "tile_ids")
# at most this many dense diagonals are planned (struct masks have one), each at least this long
MAX_DIAGONALS = 8
_MIN_DIAGONAL = 16
# a rest left in this many rows beside dense lines becomes dense rows too
_FEW_LINES = 2
CPU_TILE = 256
# Without dense rows or columns a mask is planned (put in tile order) only from this size on:
# smaller ones run as fast in sorted order.
MIN_PLANNED_NNZ = 4096

CPU_PATHS = ("inductor_rowdot", "sampled_addmm", "dense_bands", "torch_gather")
TRITON_PATHS = ("triton_gather", "triton_tiles")
PATHS = CPU_PATHS + TRITON_PATHS

# CPU cost model: rough rates per second, calibrated with bench/kernel_ops.py (bench/RESULTS.md);
# only their ratios matter, the path with the smallest estimate wins.
_CPU_ROWDOT_MACS = 6e9  # Inductor row-dot, per masked element and step of T
_CPU_SAMPLED_MACS = 2e9  # sampled_addmm, the same
_CPU_GEMM_MACS = 2.5e10  # torch.mm over whole row bands
_CPU_TRANSPOSE = 3e8  # elements of a and b transposed into chunk buffers (from memory)
_CPU_GATHER = 2e8  # elements gathered from columns of a and b by index_select
_CPU_CALL = 1e-4  # seconds per compiled row-dot call (one per chunk of T)
_TINY_WORK = 1 << 18  # masked elements x T below which plain gathers win (and nothing compiles)
# CUDA cost model, not yet calibrated on a GPU (bench/gpu.py measures every path and reports
# where this pick was not the fastest): tile-kernel FLOP/s by dot dtype (fp32: IEEE, no tensor
# cores), gather-dot bytes/s of gathered reads.
_GPU_TILE_FLOPS = {torch.float32: 2e13, torch.bfloat16: 3e14, torch.float16: 3e14}
_GPU_GATHER_BYTES = 1e12
_UPCAST_CHUNK = 128
# elements of the temporaries a streamed part (diagonals, gathers) holds at a time
_STREAM_ELEMS = 1 << 18


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

    Returns `[rows, cols, diag, rest, perm, tile_ptr, tile_ids]` (PLAN_FIELDS) on the indices'
    device:

    - `rows` (int64): rows holding at least `min_fill` of their elements, computed as one GEMM;
    - `cols` (int64): columns holding at least `min_fill` of their elements outside `rows`;
    - `diag` (int64): the flat offsets of whole diagonals (up to MAX_DIAGONALS) holding at least
      `min_fill` of their elements outside those rows and columns, one diagonal after another
      (struct's diagonal): each is a column-wise dot of two column slices of a and b;
    - `rest` (the indices' dtype): the other flat offsets, CPU_TILE×CPU_TILE block by block and
      TILE×TILE block by block inside those, sorted inside each TILE block;
    - `perm` (int64, nnz): `cat(row_block.flatten(), col_block.flatten(), diag_values,
      rest_values)[perm]` is the gradient in the order of `indices` (row_block is
      (len(rows), ncols), col_block (nrows, len(cols)));
    - `tile_ptr`, `tile_ids` (int32): `rest[tile_ptr[i]:tile_ptr[i + 1]]` lie in TILE block
      `tile_ids[i]`, numbered row-major.

    A plan without dense lines is made only for at least `min_nnz` elements on a matrix larger
    than one tile (`min_nnz=0`: always; `min_fill > 1`: no dense lines). O(nnz + nrows + ncols)
    time and memory; run it once per mask (it checks that the indices are sorted, unique and in
    range).
    """
    _check_indices("plan_mask", indices, nrows, ncols)
    nnz = indices.shape[0]
    if nnz == 0:
        return []
    idx = indices.long()
    dev = idx.device
    r = idx // ncols
    c = idx - r * ncols
    dense_row = torch.bincount(r, minlength=nrows) >= _fill_count(min_fill, ncols)
    dense_col = None
    promoted = False
    while True:  # a second pass only after promoting a leftover line (below)
        in_row = dense_row[r]
        nr = int(dense_row.sum())
        if dense_col is None:
            dense_col = torch.bincount(c[~in_row], minlength=ncols) >= _fill_count(min_fill, nrows - nr)
        in_col = dense_col[c] & ~in_row
        nc = int(dense_col.sum())
        # diagonals c - r = delta, numbered delta + nrows - 1, of length
        # min(nrows, ncols - delta) - max(0, -delta)
        free = ~(in_row | in_col)
        delta = torch.arange(1 - nrows, ncols, device=dev)
        length = torch.minimum(torch.full_like(delta, nrows), ncols - delta) - (-delta).clamp(min=0)
        count = torch.bincount((c - r + nrows - 1)[free], minlength=nrows + ncols - 1)
        need = length + 1 if min_fill > 1 else (length * min_fill).ceil().long().clamp(min=1)
        score = torch.where((count >= need) & (length >= _MIN_DIAGONAL), count, 0)
        top = torch.topk(score, min(MAX_DIAGONALS, score.numel())).indices
        dense_diag = torch.zeros_like(score, dtype=torch.bool)
        dense_diag[top[score[top] > 0]] = True
        in_diag = free & dense_diag[c - r + nrows - 1]
        rest_sel = free & ~in_diag
        # a rest within a line or two beside dense lines (struct's partial row, or column when
        # transposed) joins them: a GEMM line costs less than transposing a and b for it
        if promoted or min_fill > 1 or not (nr or nc or bool(in_diag.any())) or not bool(rest_sel.any()):
            break
        rest_rows, rest_cols = r[rest_sel].unique(), c[rest_sel].unique()
        if rest_rows.numel() <= _FEW_LINES:
            dense_row[rest_rows] = True
        elif rest_cols.numel() <= _FEW_LINES:
            dense_col[rest_cols] = True
        else:
            break
        promoted = True
    m = int(rest_sel.sum())
    one_tile = nrows <= TILE and ncols <= TILE
    if nr == 0 and nc == 0 and not bool(in_diag.any()) and min_nnz > 0 and (m < min_nnz or one_tile):
        return []
    # the dense diagonals' elements, one whole diagonal after another
    diag_ids = dense_diag.nonzero().view(-1)
    diag_len = length[diag_ids]
    diag_start = torch.cumsum(diag_len, 0) - diag_len
    which = torch.repeat_interleave(torch.arange(diag_ids.numel(), device=dev), diag_len)
    step = torch.arange(int(diag_len.sum()), device=dev) - diag_start[which]
    d = delta[diag_ids][which]
    diag_r = (-d).clamp(min=0) + step
    diag = diag_r * ncols + diag_r + d
    # the rest, block by block
    rr, cc = r[rest_sel], c[rest_sel]
    sub = CPU_TILE // TILE
    key = (rr // CPU_TILE) * math.ceil(ncols / CPU_TILE) + cc // CPU_TILE
    key = key * sub * sub + (rr % CPU_TILE) // TILE * sub + (cc % CPU_TILE) // TILE
    order = torch.sort(key, stable=True).indices
    rest = indices[rest_sel][order]
    # where each element of the sorted mask sits among the concatenated parts
    perm = torch.empty(nnz, dtype=torch.int64, device=dev)
    row_rank = torch.cumsum(dense_row, 0) - 1
    col_rank = torch.cumsum(dense_col, 0) - 1
    perm[in_row] = row_rank[r[in_row]] * ncols + c[in_row]
    base = nr * ncols
    perm[in_col] = base + r[in_col] * nc + col_rank[c[in_col]]
    base += nrows * nc
    diag_rank = torch.cumsum(dense_diag, 0) - 1
    on = (c - r + nrows - 1)[in_diag]
    perm[in_diag] = base + diag_start[diag_rank[on]] + r[in_diag] - (-delta[on]).clamp(min=0)
    base += diag.numel()
    rank = torch.empty(m, dtype=torch.int64, device=dev)
    rank[order] = torch.arange(m, device=dev)
    perm[rest_sel] = base + rank
    # the TILE blocks holding rest elements, each one run in `rest`
    tile = (rr[order] // TILE) * math.ceil(ncols / TILE) + cc[order] // TILE
    tile_ids, counts = torch.unique_consecutive(tile, return_counts=True)
    tile_ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return [dense_row.nonzero().view(-1), dense_col.nonzero().view(-1), diag, rest, perm,
            tile_ptr.int(), tile_ids.int()]


def no_plan(indices: Tensor) -> list[Tensor]:
    """The seven empty tensors `masked_grad` reads as "no plan": a layer whose mask has no
    structure holds these, so every layer passes the same tensors to a compiled graph (one
    graph for blocks whose masks differ in structure)."""
    dev = indices.device
    return [torch.empty(0, dtype=torch.int64, device=dev) for _ in range(3)] + [  # distinct tensors:
        # Dynamo guards on aliasing between a graph's inputs
        indices.new_empty(0), torch.empty(0, dtype=torch.int64, device=dev),
        torch.empty(0, dtype=torch.int32, device=dev), torch.empty(0, dtype=torch.int32, device=dev)]


def _diagonals(a: Tensor, b: Tensor, diag: Tensor, ncols: int) -> Tensor:
    """fp32 values at the plan's `diag` offsets (whole diagonals, one after another): per
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
        tiles = 2 * n_tiles * TILE * TILE * T / _GPU_TILE_FLOPS.get(dot_dtype, _GPU_TILE_FLOPS[torch.float32])
        size = torch.finfo(dtype_a).bits // 8 + torch.finfo(dtype_b).bits // 8
        gather = m * T * size / _GPU_GATHER_BYTES
        return "triton_tiles" if tiles < gather else "triton_gather"
    work = m * T
    if work <= _TINY_WORK:
        return "torch_gather"
    rowdot = sddmm_inductor.available()
    costs = {
        "torch_gather": 2 * work / _CPU_GATHER,
        "dense_bands": min(math.ceil(A / CPU_TILE), m) * CPU_TILE * B * T / _CPU_GEMM_MACS,
        "inductor_rowdot" if rowdot else "sampled_addmm": (
            work / (_CPU_ROWDOT_MACS if rowdot else _CPU_SAMPLED_MACS) + T * (A + B) / _CPU_TRANSPOSE
            + math.ceil(T / sddmm_inductor.CHUNK) * _CPU_CALL),
    }
    return min(costs, key=costs.get)


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
    if plan and len(plan) != len(PLAN_FIELDS):
        raise ValueError(f"masked_grad: a plan holds {len(PLAN_FIELDS)} tensors {PLAN_FIELDS} "
                         f"(plan_mask), found {len(plan)}")
    if plan and plan[PLAN_FIELDS.index("perm")].numel() == 0:
        plan = []  # no_plan(): a layer without structure, kept the same arity as its neighbours
    planned = plan[PLAN_FIELDS.index("perm")].shape[0] if plan else nnz
    if planned != nnz:
        raise ValueError(f"masked_grad: the plan was made for {planned} indices, found {nnz}")
    if nnz == 0 or T == 0:
        return torch.zeros(nnz, dtype=torch.float32, device=a.device)
    if not plan and path == "triton_tiles":  # tile lists, without dense parts
        plan = plan_mask(indices, a.shape[1], ncols, min_fill=2.0, min_nnz=0)
    if plan:
        rows, cols, diag, rest, perm, tile_ptr, tile_ids = plan
        tiles = (tile_ptr, tile_ids)
    else:
        rows = cols = diag = None
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
    if diag is not None and diag.numel():
        # coalesced reads for the gather kernel; column slices streamed on CPU
        parts.append(sddmm(a, b, diag, ncols) if on_triton or a.is_cuda else _diagonals(a, b, diag, ncols))
    if rest.numel():
        parts.append(_remaining(a, b, rest, ncols, tiles, chosen))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out if perm is None else out[perm]
