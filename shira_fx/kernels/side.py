"""Sparse side path: the SHiRA delta applied beside a base linear instead of fused into it,
`y = base_linear(x) + x @ S.T` (S the sparse (out, in) delta: sorted flat `indices`, `values`),
for a quantized base (the packed weight cannot hold base + delta). Forward `x @ S.T` and input
gradient `grad_y @ S` cost nnz * T multiply-adds each, one sparse-times-dense kernel on a CSR
matrix (S by rows, or S.T by rows through a sort); the values' gradient is the masked gradient.
Indices must be sorted and unique (validated where adapters enter, not per call). Paths:
Triton on CUDA (CPU only under TRITON_INTERPRET=1), `torch.sparse.mm` on CPU (`side_cpu`), a
GEMM on the delta written out densely where that is cheaper (`side_product`), and a dense
reference per function. Mixed batches: `side_segmented`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from .side_cpu import spmm_cpu

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_VALUE_FLOATS = _FLOATS + (torch.float64,)
_INTS = (torch.int32, torch.int64)
# elements of the (nonzeros x tokens) tile one program accumulates; BLOCK_K * BLOCK_T
_TILE = 2048
# the CPU path multiplies S by slices of the transposed input whose bytes fit in a core's L2
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
        out = spmm_cpu(src2, crow, col, val, dst_features, [(0, T, 0)], src.dtype)
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




# --------------------------------------------------------------------------------------------
# the dispatchers of the side ops: the sparse kernel, or a GEMM on the delta written out densely

# on the CPU a sparse side product (a quantized layer's adapter, a mixed batch's rows) runs as a
# GEMM on the delta written out densely when the sparse kernel would cost more than writing it:
# tokens * nnz multiply-adds against out * in written elements, a multiply-add through the
# sparse kernel costing about half a written element (measured at 512x512..2048x2048,
# 1.5-6 % density, 128-256 tokens)
DENSE_COPY_TOKENS_X_NNZ = 2.0


def dense_is_cheaper(tokens: int, nnz: int, numel: int) -> bool:
    """Whether writing a delta of `nnz` elements out densely (`numel`) and running a GEMM beats
    the sparse kernel for `tokens` rows on the CPU."""
    return nnz > 0 and tokens * nnz >= DENSE_COPY_TOKENS_X_NNZ * numel


def _dense_delta_if_cheaper(src: Tensor, values: Tensor, indices: Tensor, out_features: int,
                            in_features: int) -> Tensor | None:
    """S as a dense fp32 (out, in) matrix, for a CPU side product whose tokens x nnz outweigh
    writing S out (a GEMM then beats the sparse kernel); else None. Transient, like the
    dequantized weight the quantized layer's own matmul forms on the CPU."""
    if src.device.type != "cpu" or not dense_is_cheaper(src.shape[0], indices.numel(),
                                                        out_features * in_features):
        return None
    dense = values.new_zeros(out_features * in_features, dtype=torch.float32)
    dense[indices.long()] = values.detach().float()
    return dense.view(out_features, in_features)


def side_product(x: Tensor, indices: Tensor, values: Tensor, out_features: int, in_features: int) -> Tensor:
    """`x @ S.T` for x (..., in) by the cheapest exact path: the `shira_fx::side_linear` op's."""
    x2 = x.reshape(-1, x.shape[-1])
    dense = _dense_delta_if_cheaper(x2, values, indices, out_features, in_features)
    y = side_forward(x2, indices, values, out_features, in_features) if dense is None else (
        (x2.float() @ dense.T).to(x.dtype))
    return y.reshape(*x.shape[:-1], out_features)


def side_product_t(grad_y: Tensor, indices: Tensor, values: Tensor, out_features: int,
                   in_features: int) -> Tensor:
    """`grad_y @ S` for grad_y (..., out) by the cheapest exact path: `shira_fx::side_grad_x`'s."""
    gy = grad_y.reshape(-1, out_features)
    dense = _dense_delta_if_cheaper(gy, values, indices, out_features, in_features)
    grad_x = (side_backward_x(gy, indices, values, out_features, in_features) if dense is None
              else (gy.float() @ dense).to(grad_y.dtype))
    return grad_x.reshape(*grad_y.shape[:-1], in_features)
