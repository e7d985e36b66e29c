"""A mask's structure for the masked gradient, built once from its indices.

`mask_structure` splits a mask into dense rows and dense columns of the stored (nrows, ncols)
matrix (struct masks' rows, or columns on a transposed layout; computed as GEMMs over just
those rows or columns), dense diagonals (struct's; streamed, a few rows of T at a time) and
the remaining elements, put in tile order: CPU_TILE×CPU_TILE blocks, and TILE×TILE blocks
inside them, so that the GPU tile kernel (which wants each tile's elements together) and the
CPU row-dot (which wants each thread's elements to read few columns) find what they need.
`masked_sddmm` reads it.
"""

import math

import torch
from torch import Tensor

from .sddmm import TILE

STRUCTURE_FIELDS = ("rows", "cols", "diag", "rest", "perm", "tile_ptr", "tile_ids")
# at most this many dense diagonals are kept apart (struct masks have one), each at least this long
MAX_DIAGONALS = 8
_MIN_DIAGONAL = 16
# a rest left in this many rows beside dense lines becomes dense rows too
_FEW_LINES = 2
CPU_TILE = 256
# Without dense rows or columns a mask is structured (put in tile order) only from this size on:
# smaller ones run as fast in sorted order.
MIN_STRUCTURED_NNZ = 4096


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


def mask_structure(
    indices: Tensor, nrows: int, ncols: int, *, min_fill: float = 0.5,
    min_nnz: int = MIN_STRUCTURED_NNZ,
) -> list[Tensor]:
    """The structure of a sorted unique index set on the (nrows, ncols) matrix as stored, for
    `masked_sddmm`; `[]` when there is none worth using.

    Returns `[rows, cols, diag, rest, perm, tile_ptr, tile_ids]` (STRUCTURE_FIELDS) on the indices'
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

    A structure without dense lines is made only for at least `min_nnz` elements on a matrix larger
    than one tile (`min_nnz=0`: always; `min_fill > 1`: no dense lines). O(nnz + nrows + ncols)
    time and memory; run it once per mask (it checks that the indices are sorted, unique and in
    range).
    """
    _check_indices("mask_structure", indices, nrows, ncols)
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


def no_structure(indices: Tensor) -> list[Tensor]:
    """The seven empty tensors `masked_sddmm` reads as "no structure": a layer whose mask has no
    structure holds these, so every layer passes the same tensors to a compiled graph (one
    graph for blocks whose masks differ in structure)."""
    dev = indices.device
    return [torch.empty(0, dtype=torch.int64, device=dev) for _ in range(3)] + [  # distinct tensors:
        # Dynamo guards on aliasing between a graph's inputs
        indices.new_empty(0), torch.empty(0, dtype=torch.int64, device=dev),
        torch.empty(0, dtype=torch.int32, device=dev), torch.empty(0, dtype=torch.int32, device=dev)]

