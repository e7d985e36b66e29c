"""Masked gradient: a sampled dense-dense matmul (SDDMM).

`out[k] = (a.T @ b).view(-1)[indices[k]]` for a (T, A), b (T, B), computed at the nnz masked
positions only, so the A×B product (a dense dW) is never formed.
"""

import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK_K = 64
_BLOCK_T = 64
# Below this many programs over nnz alone, T is split across programs too so that small
# layers still fill the GPU (an H100 has 132 SMs).
_MIN_PROGRAMS = 512
_REFERENCE_CHUNK = 4096


@triton.jit
def _sddmm_kernel(
    at_ptr, bt_ptr, idx_ptr, out_ptr, nnz, T, ncols, stride_a, stride_b, t_per_split,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < nnz
    # int64: row * stride passes 2**31 once A * T does (a 128k vocabulary at T = 16k)
    idx = tl.load(idx_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    a_rows = at_ptr + (idx // ncols) * stride_a
    b_rows = bt_ptr + (idx % ncols) * stride_b
    t_start = pid_t * t_per_split
    t_end = tl.minimum(t_start + t_per_split, T)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        m = mask_k[:, None] & (offs_t[None, :] < t_end)
        x = tl.load(a_rows[:, None] + offs_t[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(b_rows[:, None] + offs_t[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(x * y, axis=1)
    tl.store(out_ptr + pid_t.to(tl.int64) * nnz + offs_k, acc, mask=mask_k)


def _check_args(name: str, a: Tensor, b: Tensor, indices: Tensor, ncols: int) -> None:
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


def sddmm(a: Tensor, b: Tensor, indices: Tensor, ncols: int) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[indices]` by a Triton kernel, without forming the A×B product.

    The GPU path of the masked gradient; on CPU it runs only under TRITON_INTERPRET=1.
    """
    _check_args("sddmm", a, b, indices, ncols)
    nnz, T = indices.shape[0], a.shape[0]
    if nnz == 0 or T == 0:
        return torch.zeros(nnz, dtype=torch.float32, device=a.device)
    # (A, T) and (B, T) row-major: each masked element then reads two contiguous rows
    at = a.t().contiguous()
    bt = b.t().contiguous()
    k_blocks = triton.cdiv(nnz, _BLOCK_K)
    t_blocks = triton.cdiv(T, _BLOCK_T)
    split = min(t_blocks, max(1, _MIN_PROGRAMS // k_blocks))
    t_per_split = triton.cdiv(t_blocks, split) * _BLOCK_T
    split = triton.cdiv(T, t_per_split)
    # partial sums per T-split are reduced afterwards rather than with atomics, so the
    # gradient is deterministic
    out = torch.empty(split, nnz, dtype=torch.float32, device=a.device)
    # triton launches on the current CUDA device, not on the tensors' one
    with torch.cuda.device(a.device.index if a.is_cuda else -1):
        _sddmm_kernel[(k_blocks, split)](
            at, bt, indices.contiguous(), out, nnz, T, ncols, at.stride(0), bt.stride(0),
            t_per_split, BLOCK_K=_BLOCK_K, BLOCK_T=_BLOCK_T,
        )
    return out[0] if split == 1 else out.sum(0)


def sddmm_cpu(a: Tensor, b: Tensor, indices: Tensor, ncols: int) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[indices]` through `torch.sparse.sampled_addmm` with a CSR mask.

    The CPU path of the masked gradient (bench/RESULTS.md compares it with gathering).
    """
    _check_args("sddmm_cpu", a, b, indices, ncols)
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
        # a.T as a view, not a contiguous copy (no T×A copy, and no slower);
        # CPU sampled_addmm rejects bf16/fp16
        out = torch.sparse.sampled_addmm(mask, a.t().float(), b.float(), beta=0.0)
    return out.values()


def sddmm_reference(a: Tensor, b: Tensor, indices: Tensor, ncols: int) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[indices]` by gathering columns of a and b, chunk by chunk.

    The test oracle: plain torch, written for clarity, not speed.
    """
    idx = indices.long()
    out = torch.empty(idx.shape[0], dtype=torch.float32, device=a.device)
    for start in range(0, idx.shape[0], _REFERENCE_CHUNK):
        part = idx[start : start + _REFERENCE_CHUNK]
        rows, cols = part // ncols, part % ncols
        out[start : start + part.shape[0]] = (a[:, rows].float() * b[:, cols].float()).sum(0)
    return out
