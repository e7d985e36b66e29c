"""Sparse side path: the SHiRA delta applied beside a base linear instead of fused into it,
`y = base_linear(x) + x @ S.T` (S the sparse (out, in) delta: sorted flat `indices`, `values`),
for a quantized base (the packed weight cannot hold base + delta) and a mixed batch (segments
of rows, each with its own adapter, packed with per-adapter offsets: which adapter a segment
uses is data, never a shape). Forward `x @ S.T` and input gradient `grad_y @ S` cost nnz * T
multiply-adds each, one sparse-times-dense kernel on a CSR matrix (S by rows, or S.T by rows
through a sort); the values' gradient is the masked gradient (`sddmm`). Indices must be sorted
and unique per adapter (validated where adapters enter, not per call). Paths: Triton on CUDA
(CPU only under TRITON_INTERPRET=1), `torch.sparse.mm` on CPU, a dense reference per function.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import defaultdict
from itertools import pairwise

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_VALUE_FLOATS = _FLOATS + (torch.float64,)
_INTS = (torch.int32, torch.int64)
# elements of the (nonzeros x tokens) tile one program accumulates; BLOCK_K * BLOCK_T
_TILE = 2048
# the CPU path multiplies S by slices of the transposed input whose bytes fit in a core's L2
# cache, since each nonzero reads one row of that slice; an input this small is one slice
_CPU_SLICE_BYTES = 1 << 18
_CPU_WHOLE_BYTES = 1 << 20
_CPU_MIN_SLICE = 16


# --------------------------------------------------------------------------------------------
# Triton


@triton.jit
def _spmm_kernel(
    src_t_ptr, crow_ptr, col_ptr, val_ptr, out_t_ptr,
    tile_t0_ptr, tile_t1_ptr, tile_adapter_ptr,
    n_rows, stride_src, stride_out,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """out_t[r, t] = sum over row r's nonzeros k of val[k] * src_t[col[k], t], for the tokens
    t of one tile, with the CSR matrix of the tile's adapter (crow row `adapter`)."""
    # one flat grid (no 65535 limit on a second axis); consecutive programs take consecutive
    # rows of one tile, so the tile's tokens are read from cache after the first rows
    pid = tl.program_id(0)
    tile = pid // n_rows
    r = pid % n_rows
    t0 = tl.load(tile_t0_ptr + tile)
    t1 = tl.load(tile_t1_ptr + tile)
    adapter = tl.load(tile_adapter_ptr + tile)
    used = adapter >= 0
    # a tile without an adapter (padding) is empty (t1 = t0): no loop, nothing stored
    row = crow_ptr + tl.maximum(adapter, 0).to(tl.int64) * (n_rows + 1) + r
    start = tl.load(row)
    end = tl.where(used, tl.load(row + 1), start)
    offs_t = t0 + tl.arange(0, BLOCK_T)
    mask_t = offs_t < t1
    acc = tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < end
        # int64: col * stride passes 2**31 once in_features * T does
        col = tl.load(col_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
        val = tl.load(val_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        src = tl.load(
            src_t_ptr + col[:, None] * stride_src + offs_t[None, :],
            mask=mask_k[:, None] & mask_t[None, :], other=0.0,
        ).to(tl.float32)
        acc += val[:, None] * src
    tl.store(out_t_ptr + r.to(tl.int64) * stride_out + offs_t, tl.sum(acc, axis=0), mask=mask_t)


# the interpreter runs the kernel on CPU tensors (tests without a GPU)
_INTERPRETED = isinstance(_spmm_kernel, InterpretedFunction)


def _block_t(rows_per_segment: int) -> int:
    return max(16, min(64, triton.next_power_of_2(max(1, rows_per_segment))))


def _tiles_single(T: int, block_t: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The tile table of one segment [0, T) using adapter 0: first token, end, adapter per tile
    (device factories only: no host-to-device copy)."""
    n_tiles = triton.cdiv(T, block_t)
    t0 = torch.arange(n_tiles, device=device, dtype=torch.int64) * block_t
    return t0, torch.full_like(t0, T), torch.zeros_like(t0)


def _tiles_segmented(
    T: int, block_t: int, seg_starts: Tensor, seg_adapters: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The tile table of a mixed batch: each segment's rows in tiles of block_t, a base
    segment's in none. Built on the device and sized by an upper bound known from the shapes,
    cdiv(T, block_t) + number of segments, so no value is read back to the host; the
    tiles past the last used one get adapter -1 and do nothing."""
    n_segments = seg_adapters.shape[0]
    starts = seg_starts.to(torch.int64).clamp(0, T)
    lengths = (starts[1:] - starts[:-1]).clamp_min(0)
    lengths = torch.where(seg_adapters >= 0, lengths, 0)
    tiles = (lengths + block_t - 1) // block_t
    last_tile = torch.cumsum(tiles, 0)
    tile = torch.arange(triton.cdiv(T, block_t) + n_segments, device=starts.device)
    seg = torch.searchsorted(last_tile, tile, right=True)
    inside = seg < n_segments
    seg = seg.clamp_max(n_segments - 1)
    t0 = starts[seg] + (tile - (last_tile - tiles)[seg]) * block_t
    adapter = torch.where(inside, seg_adapters[seg].to(torch.int64), -1)
    # a tile without an adapter is empty: t1 = t0
    t1 = torch.where(adapter >= 0, starts[seg] + lengths[seg], t0)
    return t0, t1, adapter


def _spmm_triton(
    src: Tensor, crow: Tensor, col: Tensor, val: Tensor, n_rows: int,
    seg_starts: Tensor | None = None, seg_adapters: Tensor | None = None,
) -> Tensor:
    """fp32 (n_rows, T), transposed: column t is (CSR matrix a) @ src[t] for the adapter a of
    t's segment (one segment [0, T) with adapter 0 when no segments are given); columns of
    base segments and outside every segment are zero. Nothing is read back to the host."""
    T = src.shape[0]
    n_segments = 1 if seg_adapters is None else seg_adapters.shape[0]
    if T == 0 or n_rows == 0 or n_segments == 0 or col.shape[0] == 0:
        return torch.zeros(n_rows, T, dtype=torch.float32, device=src.device)
    # one segment covering every token: every element is stored, so nothing to zero first
    alloc = torch.empty if seg_adapters is None else torch.zeros
    out_t = alloc(n_rows, T, dtype=torch.float32, device=src.device)
    block_t = _block_t(triton.cdiv(T, n_segments))
    if seg_adapters is None:
        t0, t1, adapter = _tiles_single(T, block_t, src.device)
    else:
        t0, t1, adapter = _tiles_segmented(T, block_t, seg_starts, seg_adapters)
    # (features, T) row-major: each nonzero then reads one contiguous run of tokens
    src_t = src.t().contiguous()
    if src_t.shape[0] < 2**31:
        col = col.to(torch.int32)
    # triton launches on the current CUDA device, not on the tensors' one
    with torch.cuda.device(src.device.index if src.is_cuda else -1):
        _spmm_kernel[(n_rows * t0.shape[0],)](
            src_t, crow, col, val, out_t, t0, t1, adapter,
            n_rows, src_t.stride(0), out_t.stride(0),
            BLOCK_K=_TILE // block_t, BLOCK_T=block_t,
        )
    return out_t


def _untranspose(out_t: Tensor, dtype: torch.dtype) -> Tensor:
    """(R, T) fp32 -> contiguous (T, R) in dtype, rounded once by torch."""
    out = torch.empty(out_t.shape[1], out_t.shape[0], dtype=dtype, device=out_t.device)
    out.copy_(out_t.t())
    return out


# --------------------------------------------------------------------------------------------
# CSR matrices from flat offsets


def _csr(
    indices: Tensor, values: Tensor, offsets: Tensor | None, out_features: int, in_features: int,
    transpose: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Row starts (A, R + 1), column indices and values of each adapter's S (R = out_features)
    or S.T (R = in_features, transpose=True), all adapters' nonzeros in one CSR order; row
    starts are positions into the shared column and value tensors.

    Sorted flat offsets are S's CSR order already; S.T's comes from a stable sort by column
    (rows stay ascending within a column).
    """
    idx = indices.to(torch.int64)
    device = idx.device
    rows, cols = idx // in_features, idx % in_features
    major, minor = (cols, rows) if transpose else (rows, cols)
    n_major = in_features if transpose else out_features
    if offsets is None:
        n_adapters, group = 1, major
    else:
        n_adapters = offsets.shape[0] - 1
        counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
        # output_size: known from the shape, so the GPU is not synchronised
        adapter = torch.repeat_interleave(
            torch.arange(n_adapters, device=device), counts, output_size=idx.shape[0]
        )
        group = adapter * n_major + major
    if transpose:
        # int32 keys sort faster; stability keeps each column's rows ascending
        narrow = group.to(torch.int32) if n_adapters * n_major < 2**31 else group
        order = torch.argsort(narrow, stable=True)
        group, minor, values = group[order], minor[order], values[order]
    firsts = torch.arange(n_adapters, device=device)[:, None] * n_major
    crow = torch.searchsorted(group, firsts + torch.arange(n_major + 1, device=device))
    return crow, minor, values


# --------------------------------------------------------------------------------------------
# CPU


def _cpu_slice(n_cols: int, T: int) -> int:
    """Tokens per slice: a power of two whose fp32 (n_cols, slice) block fits the budget."""
    if 4 * n_cols * T <= _CPU_WHOLE_BYTES:
        return max(1, T)
    rows = _CPU_SLICE_BYTES // (4 * max(1, n_cols))
    return min(max(1, T), max(_CPU_MIN_SLICE, 1 << max(0, rows.bit_length() - 1)))


def _spmm_cpu_into(out: Tensor, src: Tensor, crow: Tensor, col: Tensor, val: Tensor,
                   n_rows: int) -> None:
    """out (T, n_rows) = src (T, n_cols) @ M.T for one CSR matrix M, by `torch.sparse.mm` on
    slices of tokens; bf16/fp16 inputs are multiplied in fp32 and rounded once at the end.

    Each slice is transposed into one reused (n_cols, slice) buffer and multiplied into
    another with beta = 0, so no slice allocates or zero-fills."""
    n_cols = src.shape[1]
    step = _cpu_slice(n_cols, src.shape[0])
    part = torch.empty(n_cols, step, dtype=torch.float32)
    prod = torch.empty(n_rows, step, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        m = torch.sparse_csr_tensor(
            crow, col, val.to(torch.float32), (n_rows, n_cols), check_invariants=False
        )
        for t in range(0, src.shape[0], step):
            n = min(step, src.shape[0] - t)
            if n < step:  # the last, shorter slice: fresh contiguous buffers
                part, prod = part[:, :n].contiguous(), prod[:, :n].contiguous()
            # one pass: transposed to (n_cols, n) row-major and cast to fp32
            part.copy_(src[t : t + n].t())
            torch.addmm(prod, m, part, beta=0.0, out=prod)
            out[t : t + n] = prod.t()


def _spmm_cpu(
    src: Tensor, crow: Tensor, col: Tensor, val: Tensor, n_rows: int,
    segments: list[tuple[int, int, int]], dtype: torch.dtype,
) -> Tensor:
    """(T, n_rows) in `dtype`: each (start, end, adapter) segment's rows times its adapter's
    CSR matrix, other rows zero; segments in order and disjoint. Segments of one adapter are
    multiplied together."""
    T = src.shape[0]
    out = torch.empty(T, n_rows, dtype=dtype)
    by_adapter: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for start, end, a in segments:
        if a >= 0 and end > start:
            by_adapter[a].append((start, end))
    bounds = crow[:, [0, -1]].tolist() if by_adapter else []
    computed: list[tuple[int, int]] = []
    for a, spans in by_adapter.items():
        lo, hi = bounds[a]
        if hi == lo:  # an empty index set: its rows stay zero
            continue
        a_crow = crow[a] - lo
        a_col, a_val = col[lo:hi], val[lo:hi]
        computed += spans
        if len(spans) == 1:
            start, end = spans[0]
            _spmm_cpu_into(out[start:end], src[start:end], a_crow, a_col, a_val, n_rows)
            continue
        rows = torch.cat([src[s:e] for s, e in spans])
        part = torch.empty(rows.shape[0], n_rows, dtype=dtype)
        _spmm_cpu_into(part, rows, a_crow, a_col, a_val, n_rows)
        pos = 0
        for s, e in spans:
            out[s:e] = part[pos : pos + e - s]
            pos += e - s
    # zero only the rows no product wrote
    pos = 0
    for start, end in sorted(computed):
        if start > pos:
            out[pos:start].zero_()
        pos = max(pos, end)
    if pos < T:
        out[pos:].zero_()
    return out


# --------------------------------------------------------------------------------------------
# argument checks (metadata only, no device synchronisation)


def _check_features(name: str, out_features: int, in_features: int) -> None:
    for label, v in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: {label} must be a non-negative int, found {v!r}")


def _check_input(name: str, label: str, x: Tensor, features: int, label_features: str,
                 two_d: bool) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: {label} must be a Tensor, found {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name}: {label} must be fp32, bf16 or fp16, found {x.dtype}")
    if (x.dim() != 2 if two_d else x.dim() < 1) or x.shape[-1] != features:
        want = f"(T, {features})" if two_d else f"(..., {features})"
        raise ValueError(
            f"{name}: {label} must have shape {want} ({label_features} = {features}), "
            f"found {tuple(x.shape)}"
        )


def _check_sparse(name: str, x: Tensor, indices: Tensor, values: Tensor) -> None:
    if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.dtype not in _INTS:
        found = (f"shape {tuple(indices.shape)} dtype {indices.dtype}"
                 if isinstance(indices, Tensor) else type(indices).__name__)
        raise ValueError(f"{name}: indices must be 1-D int32 or int64, found {found}")
    if not isinstance(values, Tensor) or values.shape != indices.shape or values.dtype not in _VALUE_FLOATS:
        found = (f"shape {tuple(values.shape)} dtype {values.dtype}"
                 if isinstance(values, Tensor) else type(values).__name__)
        raise ValueError(
            f"{name}: values must be fp32, bf16, fp16 or fp64 with the indices' shape "
            f"{tuple(indices.shape)}, found {found}"
        )
    for label, t in (("indices", indices), ("values", values)):
        if t.device != x.device:
            raise ValueError(f"{name}: {label} must be on {x.device} (the input's device), found {t.device}")


def _check_segments(name: str, x: Tensor, seg_starts: Tensor, seg_adapters: Tensor,
                    adapter_offsets: Tensor) -> None:
    for label, t in (("seg_starts", seg_starts), ("seg_adapters", seg_adapters),
                     ("adapter_offsets", adapter_offsets)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in _INTS:
            found = f"shape {tuple(t.shape)} dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: {label} must be 1-D int32 or int64, found {found}")
        if t.device != x.device:
            raise ValueError(f"{name}: {label} must be on {x.device} (the input's device), found {t.device}")
    if seg_starts.shape[0] != seg_adapters.shape[0] + 1:
        raise ValueError(
            f"{name}: seg_starts must have one more entry than seg_adapters "
            f"({seg_adapters.shape[0] + 1}), found {seg_starts.shape[0]}"
        )
    if adapter_offsets.shape[0] < 1:
        raise ValueError(f"{name}: adapter_offsets must hold at least one entry (0), found none")


def _first_drop(xs: list[int]) -> int | None:
    """The first position whose entry is below the one before it, or None."""
    return next((i + 1 for i, (u, v) in enumerate(pairwise(xs)) if v < u), None)


def _check_segment_values(
    name: str, T: int, seg_starts: Tensor, seg_adapters: Tensor, adapter_offsets: Tensor,
    nnz: int,
) -> list[tuple[int, int, int]]:
    """The CPU path reads the segment table on the host anyway, so it checks its values too;
    returns the (start, end, adapter) segments."""
    starts, ids, offs = seg_starts.tolist(), seg_adapters.tolist(), adapter_offsets.tolist()
    drop = _first_drop(starts)
    if drop is not None:
        raise ValueError(f"{name}: seg_starts must be non-decreasing, found seg_starts[{drop}] = "
                         f"{starts[drop]} after {starts[drop - 1]}")
    if starts[0] < 0 or starts[-1] > T:
        raise ValueError(f"{name}: seg_starts must lie within [0, {T}] (T = x.shape[0]), "
                         f"found {starts[0]} .. {starts[-1]}")
    n_adapters = len(offs) - 1
    bad = next((i for i, a in enumerate(ids) if not -1 <= a < n_adapters), None)
    if bad is not None:
        raise ValueError(f"{name}: seg_adapters must be -1 (base) or an adapter id in [0, {n_adapters}),"
                         f" found seg_adapters[{bad}] = {ids[bad]}")
    drop = _first_drop(offs)
    if offs[0] != 0 or offs[-1] != nnz or drop is not None:
        found = (f"adapter_offsets[{drop}] = {offs[drop]} after {offs[drop - 1]}" if drop is not None
                 else f"{offs[0]} .. {offs[-1]}")
        raise ValueError(f"{name}: adapter_offsets must rise from 0 to {nnz} (the number of "
                         f"indices), found {found}")
    return [(starts[i], starts[i + 1], a) for i, a in enumerate(ids)]


# --------------------------------------------------------------------------------------------
# one adapter


def _check_common(name: str, src: Tensor, indices: Tensor, values: Tensor, out_features: int,
                  in_features: int, transpose: bool, path: str, two_d: bool) -> tuple[int, int]:
    """Checks shared by every entry point; returns (source, destination) feature counts."""
    _check_features(name, out_features, in_features)
    src_features, dst_features = (out_features, in_features) if transpose else (in_features, out_features)
    label, label_features = ("grad_y", "out_features") if transpose else ("x", "in_features")
    _check_input(name, label, src, src_features, label_features, two_d)
    _check_sparse(name, src, indices, values)
    if path == "triton" and src.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"{name}: the Triton path needs CUDA tensors, found {label} on {src.device}")
    if path == "cpu" and src.device.type != "cpu":
        raise ValueError(f"{name}: the CPU path needs CPU tensors, found {label} on {src.device}")
    return src_features, dst_features


def _path(src: Tensor) -> str:
    return "triton" if isinstance(src, Tensor) and src.is_cuda else "cpu"


@torch.no_grad()
def _single(name: str, src: Tensor, indices: Tensor, values: Tensor, out_features: int,
            in_features: int, transpose: bool, path: str) -> Tensor:
    src_features, dst_features = _check_common(name, src, indices, values, out_features,
                                               in_features, transpose, path, two_d=False)
    lead = src.shape[:-1]
    T = math.prod(lead)
    src2 = src.reshape(T, src_features)
    crow, col, val = _csr(indices, values, None, out_features, in_features, transpose)
    if path == "triton":
        out = _untranspose(_spmm_triton(src2, crow, col, val, dst_features), src.dtype)
    else:
        out = _spmm_cpu(src2, crow, col, val, dst_features, [(0, T, 0)], src.dtype)
    return out.reshape(*lead, dst_features)


def side_forward(x: Tensor, indices: Tensor, values: Tensor, out_features: int,
                 in_features: int) -> Tensor:
    """`x @ S.T` for x (..., in_features): S is the (out, in) delta with S.flat[indices] = values.

    Returns (..., out_features) in x's dtype, accumulated in fp32: nnz * T multiply-adds, S never
    formed. The Triton kernel on CUDA, `torch.sparse.mm` on CPU. Not differentiable itself
    (call it from an op with its own backward: `side_backward_x`, and `sddmm` for the values).
    """
    return _single("side_forward", x, indices, values, out_features, in_features, False, _path(x))


def side_forward_triton(x: Tensor, indices: Tensor, values: Tensor, out_features: int,
                        in_features: int) -> Tensor:
    """`side_forward` by the Triton kernel (CUDA; CPU tensors under TRITON_INTERPRET=1)."""
    return _single("side_forward_triton", x, indices, values, out_features, in_features, False,
                   "triton")


def side_forward_cpu(x: Tensor, indices: Tensor, values: Tensor, out_features: int,
                     in_features: int) -> Tensor:
    """`side_forward` by `torch.sparse.mm` on a CSR S, over L2-sized slices of tokens (CPU)."""
    return _single("side_forward_cpu", x, indices, values, out_features, in_features, False, "cpu")


def side_backward_x(grad_y: Tensor, indices: Tensor, values: Tensor, out_features: int,
                    in_features: int) -> Tensor:
    """`grad_y @ S` for grad_y (..., out_features): the input gradient of `side_forward`.

    Returns (..., in_features) in grad_y's dtype, accumulated in fp32. S.T's CSR order comes from
    one sort of the offsets by column, so there are no atomics and the result is deterministic.
    """
    return _single("side_backward_x", grad_y, indices, values, out_features, in_features, True,
                   _path(grad_y))


def side_backward_x_triton(grad_y: Tensor, indices: Tensor, values: Tensor, out_features: int,
                           in_features: int) -> Tensor:
    """`side_backward_x` by the Triton kernel (CUDA; CPU tensors under TRITON_INTERPRET=1)."""
    return _single("side_backward_x_triton", grad_y, indices, values, out_features, in_features,
                   True, "triton")


def side_backward_x_cpu(grad_y: Tensor, indices: Tensor, values: Tensor, out_features: int,
                        in_features: int) -> Tensor:
    """`side_backward_x` by `torch.sparse.mm` on a CSR S.T (CPU tensors)."""
    return _single("side_backward_x_cpu", grad_y, indices, values, out_features, in_features,
                   True, "cpu")


# --------------------------------------------------------------------------------------------
# mixed batches: segments of rows, one adapter (or none) each


@torch.no_grad()
def _segmented(name: str, src: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor,
               values: Tensor, adapter_offsets: Tensor, out_features: int, in_features: int,
               transpose: bool, path: str) -> Tensor:
    _, dst_features = _check_common(name, src, indices, values, out_features, in_features,
                                    transpose, path, two_d=True)
    _check_segments(name, src, seg_starts, seg_adapters, adapter_offsets)
    T = src.shape[0]
    if path == "cpu":
        segments = _check_segment_values(name, T, seg_starts, seg_adapters, adapter_offsets,
                                         indices.shape[0])
        crow, col, val = _csr(indices, values, adapter_offsets, out_features, in_features, transpose)
        return _spmm_cpu(src, crow, col, val, dst_features, segments, src.dtype)
    crow, col, val = _csr(indices, values, adapter_offsets, out_features, in_features, transpose)
    n_segments, n_adapters = seg_adapters.shape[0], adapter_offsets.shape[0] - 1
    # an adapter id out of range cannot be reported without reading it back from the GPU:
    # those segments' rows come out NaN rather than silently wrong
    bad = (seg_adapters < -1) | (seg_adapters >= n_adapters)
    ids = torch.where(bad, -1, seg_adapters)
    out = _untranspose(_spmm_triton(src, crow, col, val, dst_features, seg_starts, ids), src.dtype)
    if T and n_segments:
        row_seg = torch.searchsorted(seg_starts.to(torch.int64),
                                     torch.arange(T, device=src.device), right=True) - 1
        inside = (row_seg >= 0) & (row_seg < n_segments)
        row_bad = inside & bad[row_seg.clamp(0, n_segments - 1)]
        out.masked_fill_(row_bad[:, None], float("nan"))
    return out


_SEGMENT_DOC = """

    Rows [seg_starts[i], seg_starts[i+1]) of the (T, {src}) input form segment i, which uses
    adapter seg_adapters[i] (-1: none, those rows come out zero, as do rows outside every
    segment). Adapter a is indices[adapter_offsets[a]:adapter_offsets[a+1]] (sorted flat
    offsets into its (out, in) delta) with the values there. Empty segments are allowed, so a
    caller can pad the segment table to a fixed length. The CPU path checks the table's values
    (ValueError); the Triton path never synchronises, and its segments with an unknown adapter
    come out NaN.
"""


def side_forward_segmented(
    x: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor, values: Tensor,
    adapter_offsets: Tensor, out_features: int, in_features: int, path: str | None = None,
) -> Tensor:
    """`x[rows] @ S_a.T` per segment of rows, a mixed batch's side path: (T, in) -> (T, out)
    in x's dtype. The Triton kernel on CUDA, `torch.sparse.mm` per adapter on CPU (`path`:
    "triton" or "cpu" forces one)."""
    name = "side_forward_segmented" + (f"_{path}" if path else "")
    return _segmented(name, x, seg_starts, seg_adapters, indices, values,
                      adapter_offsets, out_features, in_features, False, path or _path(x))


def side_backward_x_segmented(
    grad_y: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor, values: Tensor,
    adapter_offsets: Tensor, out_features: int, in_features: int, path: str | None = None,
) -> Tensor:
    """`grad_y[rows] @ S_a` per segment, the input gradient of `side_forward_segmented`:
    (T, out) -> (T, in) in grad_y's dtype (`path` as there)."""
    name = "side_backward_x_segmented" + (f"_{path}" if path else "")
    return _segmented(name, grad_y, seg_starts, seg_adapters, indices, values,
                      adapter_offsets, out_features, in_features, True, path or _path(grad_y))


# one path each, for tests and benches
side_forward_segmented_triton = functools.partial(side_forward_segmented, path="triton")
side_forward_segmented_cpu = functools.partial(side_forward_segmented, path="cpu")
side_backward_x_segmented_triton = functools.partial(side_backward_x_segmented, path="triton")
side_backward_x_segmented_cpu = functools.partial(side_backward_x_segmented, path="cpu")


for _fn, _src in ((side_forward_segmented, "in"), (side_backward_x_segmented, "out")):
    if _fn.__doc__:  # None under python -OO
        _fn.__doc__ += _SEGMENT_DOC.format(src=_src)


def pack_adapters(adapters: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """(indices, values, adapter_offsets) for the segmented functions from per-adapter
    (indices, values) pairs: the concatenations and the int64 offsets [0, n0, n0 + n1, ...]."""
    if not adapters:
        raise ValueError("pack_adapters: expected at least one (indices, values) pair, found none")
    for i, (idx, val) in enumerate(adapters):
        if idx.dim() != 1 or val.shape != idx.shape:
            raise ValueError(
                f"pack_adapters: adapter {i} must have 1-D indices and values of one shape, "
                f"found {tuple(idx.shape)} and {tuple(val.shape)}"
            )
    counts = torch.tensor([0] + [idx.shape[0] for idx, _ in adapters], dtype=torch.int64)
    indices = torch.cat([idx for idx, _ in adapters])
    values = torch.cat([val for _, val in adapters])
    return indices, values, torch.cumsum(counts, 0).to(indices.device)


# --------------------------------------------------------------------------------------------
# references (test oracles): plain torch on the dense delta, written for clarity, not speed


def _dense_delta(indices: Tensor, values: Tensor, out_features: int, in_features: int) -> Tensor:
    s = torch.zeros(out_features * in_features, dtype=torch.float32, device=values.device)
    s[indices.long()] = values.float()
    return s.view(out_features, in_features)


def side_forward_reference(x: Tensor, indices: Tensor, values: Tensor, out_features: int,
                           in_features: int) -> Tensor:
    """`x @ S.T` through the dense S in fp32, rounded to x's dtype (the test oracle)."""
    s = _dense_delta(indices, values, out_features, in_features)
    return (x.float() @ s.t()).to(x.dtype)


def side_backward_x_reference(grad_y: Tensor, indices: Tensor, values: Tensor, out_features: int,
                              in_features: int) -> Tensor:
    """`grad_y @ S` through the dense S in fp32, rounded to grad_y's dtype (the test oracle)."""
    s = _dense_delta(indices, values, out_features, in_features)
    return (grad_y.float() @ s).to(grad_y.dtype)


def _segmented_reference(fn, src: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor,
                         values: Tensor, adapter_offsets: Tensor, out_features: int, in_features: int,
                         dst_features: int) -> Tensor:
    out = torch.zeros(src.shape[0], dst_features, dtype=src.dtype, device=src.device)
    offs = adapter_offsets.tolist()
    starts = seg_starts.tolist()
    for i, a in enumerate(seg_adapters.tolist()):
        if a < 0 or starts[i + 1] <= starts[i]:
            continue
        lo, hi = offs[a], offs[a + 1]
        out[starts[i] : starts[i + 1]] = fn(src[starts[i] : starts[i + 1]], indices[lo:hi],
                                            values[lo:hi], out_features, in_features)
    return out


def side_forward_segmented_reference(
    x: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor, values: Tensor,
    adapter_offsets: Tensor, out_features: int, in_features: int,
) -> Tensor:
    """`side_forward_segmented` as one `side_forward_reference` per segment (the test oracle)."""
    return _segmented_reference(side_forward_reference, x, seg_starts, seg_adapters, indices, values,
                                adapter_offsets, out_features, in_features, out_features)


def side_backward_x_segmented_reference(
    grad_y: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor, values: Tensor,
    adapter_offsets: Tensor, out_features: int, in_features: int,
) -> Tensor:
    """`side_backward_x_segmented` as one `side_backward_x_reference` per segment (the oracle)."""
    return _segmented_reference(side_backward_x_reference, grad_y, seg_starts, seg_adapters, indices,
                                values, adapter_offsets, out_features, in_features, in_features)

