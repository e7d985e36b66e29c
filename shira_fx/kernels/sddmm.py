"""Masked gradient: a sampled dense-dense matmul (SDDMM), kernel by kernel.

`out[k] = (a.T @ b).view(-1)[flat[k]]` for a (T, A), b (T, B) and flat offsets into the
(A, B) matrix, computed at the masked positions only, so the A×B product (a dense dW) is
never formed. Every kernel reads a and b through their strides (no transposed copies) and
accumulates in fp32. `sddmm_plan.masked_grad` picks among them; this file holds:

- `_gather_dot_kernel` / `sddmm`: one dot product over T per masked element (Triton);
- `_tile_kernel` / `sddmm_tiles`: a tensor-core dW tile per 64×64 block that holds masked
  elements, of which it writes only those (Triton; the per-tile lists come from the plan);
- `_dense_block_kernel` / `dense_block`: the dense GEMM over gathered rows or columns that
  the structured part of a mask needs, in fp32 whatever the input dtype (Triton);
- `sddmm_cpu`: `torch.sparse.sampled_addmm` with a CSR mask;
- `sddmm_reference`: plain torch gathers, the test oracle.

The Triton kernels run on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""

import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

# Side of the square dW tiles of the tile kernel; the plan's tile lists use the same.
TILE = 64
_BLOCK_K = 64
_BLOCK_T = 32
# T-splits are whole multiples of this many steps (of every kernel's T block)
_SPLIT_GRANULE = 64
_BLOCK_E = 64
# Below this many programs without splitting T, T is split across programs too so that small
# layers still fill the GPU (an H100 has 132 SMs); the partial sums are added afterwards
# rather than with atomics, so the result is deterministic.
_MIN_PROGRAMS = 512
_REFERENCE_CHUNK = 4096
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}


@triton.jit
def _gather_dot_kernel(
    a_ptr, b_ptr, idx_ptr, out_ptr, nnz, T, ncols,
    stride_at, stride_ar, stride_bt, stride_bc, t_per_split,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < nnz
    # int64: offsets pass 2**31 once T * A does (a 128k vocabulary at T = 16k)
    idx = tl.load(idx_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    t_start = pid_t.to(tl.int64) * t_per_split
    t_end = tl.minimum(t_start + t_per_split, T)
    offs_t = tl.arange(0, BLOCK_T)
    # (BLOCK_T, BLOCK_K) tiles, elements along the fast axis: neighbouring masked elements
    # (sorted, or tile by tile) read neighbouring columns of one row of a and of b
    a_ptrs = a_ptr + (idx // ncols * stride_ar)[None, :] + (t_start + offs_t)[:, None] * stride_at
    b_ptrs = b_ptr + (idx % ncols * stride_bc)[None, :] + (t_start + offs_t)[:, None] * stride_bt
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        m = ((t0 + offs_t) < t_end)[:, None] & mask_k[None, :]
        x = tl.load(a_ptrs, mask=m, other=0.0).to(tl.float32)
        y = tl.load(b_ptrs, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(x * y, axis=0)
        a_ptrs += BLOCK_T * stride_at
        b_ptrs += BLOCK_T * stride_bt
    tl.store(out_ptr + pid_t.to(tl.int64) * nnz + offs_k, acc, mask=mask_k)


@triton.jit
def _tile_kernel(
    a_ptr, b_ptr, flat_ptr, tile_ptr, tile_id_ptr, out_ptr, m, T, nrows, ncols, n_col_tiles,
    stride_at, stride_ar, stride_bt, stride_bc, t_per_split,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_t = tl.program_id(1)
    tile = tl.load(tile_id_ptr + pid)
    row0 = (tile // n_col_tiles) * BM
    col0 = (tile % n_col_tiles) * BN
    offs_m = row0 + tl.arange(0, BM)
    offs_n = col0 + tl.arange(0, BN)
    mask_m = offs_m < nrows
    mask_n = offs_n < ncols
    t_start = pid_t.to(tl.int64) * t_per_split
    t_end = tl.minimum(t_start + t_per_split, T)
    offs_t = tl.arange(0, BK)
    # a^T tile (BM, BK) and b tile (BK, BN), read through the strides of a and b
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_ar + (t_start + offs_t)[None, :] * stride_at
    b_ptrs = b_ptr + (t_start + offs_t)[:, None] * stride_bt + offs_n[None, :].to(tl.int64) * stride_bc
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t0 in range(t_start, t_end, BK):
        mask_t = (t0 + offs_t) < t_end
        x = tl.load(a_ptrs, mask=mask_m[:, None] & mask_t[None, :], other=0.0)
        y = tl.load(b_ptrs, mask=mask_t[:, None] & mask_n[None, :], other=0.0)
        if IEEE:  # fp32 inputs: no TF32 rounding, so the result matches the fp32 reference
            acc = tl.dot(x.to(DOT_DTYPE), y.to(DOT_DTYPE), acc, input_precision="ieee")
        else:  # bf16/fp16 products are exact in fp32, and the tensor cores accumulate in fp32
            acc = tl.dot(x.to(DOT_DTYPE), y.to(DOT_DTYPE), acc)
        a_ptrs += BK * stride_at
        b_ptrs += BK * stride_bt
    # write only this tile's masked elements, picked out of the accumulator by position
    flat_acc = tl.reshape(acc, [BM * BN])
    start = tl.load(tile_ptr + pid)
    end = tl.load(tile_ptr + pid + 1)
    out_row = out_ptr + pid_t.to(tl.int64) * m
    for e0 in range(start, end, BE):
        offs_e = e0 + tl.arange(0, BE)
        mask_e = offs_e < end
        f = tl.load(flat_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
        local = (f // ncols - row0) * BN + (f % ncols - col0)
        local = tl.where(mask_e, local, 0).to(tl.int32)
        tl.store(out_row + offs_e, tl.gather(flat_acc, local, 0), mask=mask_e)


@triton.jit
def _dense_block_kernel(
    a_ptr, b_ptr, ra_ptr, cb_ptr, out_ptr, n_i, n_j, T,
    stride_at, stride_ar, stride_bt, stride_bc, t_per_split,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_t = tl.program_id(2)
    offs_i = pid_m * BM + tl.arange(0, BM)
    offs_j = pid_n * BN + tl.arange(0, BN)
    mask_i = offs_i < n_i
    mask_j = offs_j < n_j
    # the block's rows are columns ra of a (or all of them), its columns columns cb of b
    if GATHER_A:
        ra = tl.load(ra_ptr + offs_i, mask=mask_i, other=0).to(tl.int64)
    else:
        ra = offs_i.to(tl.int64)
    if GATHER_B:
        cb = tl.load(cb_ptr + offs_j, mask=mask_j, other=0).to(tl.int64)
    else:
        cb = offs_j.to(tl.int64)
    t_start = pid_t.to(tl.int64) * t_per_split
    t_end = tl.minimum(t_start + t_per_split, T)
    offs_t = tl.arange(0, BK)
    a_ptrs = a_ptr + ra[:, None] * stride_ar + (t_start + offs_t)[None, :] * stride_at
    b_ptrs = b_ptr + (t_start + offs_t)[:, None] * stride_bt + cb[None, :] * stride_bc
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t0 in range(t_start, t_end, BK):
        mask_t = (t0 + offs_t) < t_end
        x = tl.load(a_ptrs, mask=mask_i[:, None] & mask_t[None, :], other=0.0)
        y = tl.load(b_ptrs, mask=mask_t[:, None] & mask_j[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x.to(DOT_DTYPE), y.to(DOT_DTYPE), acc, input_precision="ieee")
        else:
            acc = tl.dot(x.to(DOT_DTYPE), y.to(DOT_DTYPE), acc)
        a_ptrs += BK * stride_at
        b_ptrs += BK * stride_bt
    out = out_ptr + (pid_t.to(tl.int64) * n_i + offs_i[:, None]) * n_j + offs_j[None, :]
    tl.store(out, acc, mask=mask_i[:, None] & mask_j[None, :])


_INTERPRETED = isinstance(_gather_dot_kernel, InterpretedFunction)


def check_args(name: str, a: Tensor, b: Tensor, indices: Tensor, ncols: int) -> None:
    """Raise a ValueError naming what was expected and found unless a (T, A), b (T, B) share T,
    ncols == B and indices are 1-D int32/int64."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name}: expected a (T, A) and b (T, B) with the same T, "
            f"found a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if b.shape[1] != ncols:
        raise ValueError(f"{name}: ncols must equal b.shape[1] = {b.shape[1]}, found {ncols}")
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name}: expected 1-D int32 or int64 indices, "
            f"found shape {tuple(indices.shape)} dtype {indices.dtype}"
        )
    for label, t in (("a", a), ("b", b)):
        if t.dtype not in _TL_DTYPES:
            raise ValueError(f"{name}: {label} must be fp32, bf16, fp16 or fp64, found {t.dtype}")


def _split_t(T: int, programs: int, block_t: int) -> tuple[int, int]:
    """(number of T-splits, T per split): split T only when the other grid axes are too few."""
    t_blocks = triton.cdiv(T, block_t)
    split = min(t_blocks, max(1, _MIN_PROGRAMS // max(programs, 1)))
    t_per_split = triton.cdiv(t_blocks, split) * block_t
    return triton.cdiv(T, t_per_split), t_per_split


def _dot_config(a: Tensor, b: Tensor) -> dict:
    """Launch settings of the tl.dot kernels: the operand dtype, IEEE fp32 or tensor cores, and a
    T block small enough that fp32 operands (CUDA-core dots) do not spill registers."""
    dot_dtype, ieee = _dot_dtype(a, b)
    if ieee:
        return dict(DOT_DTYPE=dot_dtype, IEEE=True, BK=16, num_warps=4, num_stages=2)
    return dict(DOT_DTYPE=dot_dtype, IEEE=False, BK=32, num_warps=4, num_stages=3)


def _dot_dtype(a: Tensor, b: Tensor) -> tuple[tl.dtype, bool]:
    """The dtype both tl.dot operands are cast to in registers, and whether it is fp32 (ieee)."""
    common = torch.promote_types(a.dtype, b.dtype)
    if common == torch.float64 or (a.dtype != b.dtype and common != torch.float32):
        # fp64 is computed in fp32 like every path (the result is fp32); bf16 with fp16:
        # neither holds the other
        common = torch.float32
    if _INTERPRETED and common == torch.bfloat16:
        # triton 3.9's interpreter multiplies bf16 dot operands as integers; upcast them (the
        # products are exact in fp32 either way, so the result is the GPU's)
        common = torch.float32
    return _TL_DTYPES[common], common == torch.float32


def _device(t: Tensor) -> int:
    # triton launches on the current CUDA device, not on the tensors' one
    return t.device.index if t.is_cuda else -1


def sddmm(a: Tensor, b: Tensor, indices: Tensor, ncols: int) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[indices]`, one dot product over T per element (Triton).

    `indices` may come in any order (the plan's tile order keeps neighbouring elements'
    reads close together). Reads a and b through their strides. On CPU only under
    TRITON_INTERPRET=1.
    """
    check_args("sddmm", a, b, indices, ncols)
    nnz, T = indices.shape[0], a.shape[0]
    if nnz == 0 or T == 0:
        return torch.zeros(nnz, dtype=torch.float32, device=a.device)
    k_blocks = triton.cdiv(nnz, _BLOCK_K)
    split, t_per_split = _split_t(T, k_blocks, _SPLIT_GRANULE)
    out = torch.empty(split, nnz, dtype=torch.float32, device=a.device)
    with torch.cuda.device(_device(a)):
        _gather_dot_kernel[(k_blocks, split)](
            a, b, indices.contiguous(), out, nnz, T, ncols,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), t_per_split,
            BLOCK_K=_BLOCK_K, BLOCK_T=_BLOCK_T,
        )
    return out[0] if split == 1 else out.sum(0)


def sddmm_tiles(
    a: Tensor, b: Tensor, flat: Tensor, ncols: int, tile_ptr: Tensor, tile_ids: Tensor
) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[flat]` by tensor-core dW tiles (Triton).

    `flat` must be grouped tile by tile: `flat[tile_ptr[i]:tile_ptr[i + 1]]` are the elements
    of the TILE×TILE block `tile_ids[i]` (numbered row-major over the blocks), as
    `plan_mask` orders them. Blocks without elements cost nothing. fp32 inputs use IEEE fp32
    dots, not TF32.
    """
    check_args("sddmm_tiles", a, b, flat, ncols)
    m, T = flat.shape[0], a.shape[0]
    n_tiles = tile_ids.shape[0]
    if m == 0 or T == 0 or n_tiles == 0:
        return torch.zeros(m, dtype=torch.float32, device=a.device)
    split, t_per_split = _split_t(T, n_tiles, _SPLIT_GRANULE)
    out = torch.empty(split, m, dtype=torch.float32, device=a.device)
    with torch.cuda.device(_device(a)):
        _tile_kernel[(n_tiles, split)](
            a, b, flat.contiguous(), tile_ptr.contiguous(), tile_ids.contiguous(), out,
            m, T, a.shape[1], ncols, triton.cdiv(ncols, TILE),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), t_per_split,
            BM=TILE, BN=TILE, BE=_BLOCK_E, **_dot_config(a, b),
        )
    return out[0] if split == 1 else out.sum(0)


def dense_block(a: Tensor, b: Tensor, rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
    """fp32 `a[:, rows].T @ b[:, cols]` (all rows/columns where None) by a Triton GEMM.

    The dense part of a structured mask (whole rows or columns of dW), in fp32 for any input
    dtype; the selected columns are gathered inside the kernel, not copied.
    """
    T = a.shape[0]
    n_i = a.shape[1] if rows is None else rows.shape[0]
    n_j = b.shape[1] if cols is None else cols.shape[0]
    if n_i == 0 or n_j == 0 or T == 0:
        return torch.zeros(n_i, n_j, dtype=torch.float32, device=a.device)
    grid_mn = (triton.cdiv(n_i, TILE), triton.cdiv(n_j, TILE))
    split, t_per_split = _split_t(T, grid_mn[0] * grid_mn[1], _SPLIT_GRANULE)
    out = torch.empty(split, n_i, n_j, dtype=torch.float32, device=a.device)
    # where nothing is gathered the kernel never reads the pointer; one int64 placeholder keeps
    # the launch signatures few
    unused = torch.zeros(1, dtype=torch.int64, device=a.device)
    ra = unused if rows is None else rows.contiguous()
    cb = unused if cols is None else cols.contiguous()
    with torch.cuda.device(_device(a)):
        _dense_block_kernel[(*grid_mn, split)](
            a, b, ra, cb, out, n_i, n_j, T,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), t_per_split,
            GATHER_A=rows is not None, GATHER_B=cols is not None,
            BM=TILE, BN=TILE, **_dot_config(a, b),
        )
    return out[0] if split == 1 else out.sum(0)


def sddmm_cpu(a: Tensor, b: Tensor, indices: Tensor, ncols: int) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[indices]` through `torch.sparse.sampled_addmm` with a CSR mask.

    `indices` must be sorted. The baseline the CPU paths are measured against: it rejects
    bf16/fp16 on CPU (so those are upcast) and copies a and b into row-major transposes.
    """
    check_args("sddmm_cpu", a, b, indices, ncols)
    nrows = a.shape[1]
    idx = indices.long()
    # indices are sorted, so row r starts where the first offset >= r * ncols sits
    crow = torch.searchsorted(idx, torch.arange(nrows + 1, device=idx.device) * ncols)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        mask = torch.sparse_csr_tensor(
            crow, idx % ncols, torch.zeros(idx.shape[0], device=a.device), (nrows, ncols),
            check_invariants=False,
        )
        out = torch.sparse.sampled_addmm(mask, a.t().float(), b.float(), beta=0.0)
    return out.values()


def sddmm_reference(a: Tensor, b: Tensor, indices: Tensor, ncols: int) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[indices]` by gathering columns of a and b, chunk by chunk.

    The test oracle: plain torch, written for clarity, not speed; any index order.
    """
    idx = indices.long()
    out = torch.empty(idx.shape[0], dtype=torch.float32, device=a.device)
    for start in range(0, idx.shape[0], _REFERENCE_CHUNK):
        part = idx[start : start + _REFERENCE_CHUNK]
        rows, cols = part // ncols, part % ncols
        out[start : start + part.shape[0]] = (a[:, rows].float() * b[:, cols].float()).sum(0)
    return out
