"""The masked gradient of a convolution's weight: `dW.flat[indices]` for the weight as stored,
(out, in / groups, *kernel), without keeping a dense weight gradient.

`dW[o, c, i, j] = sum_{n, y, x} grad_y[n, o, y, x] * x_pad[n, c_g, y*s + i*d, x*s + j*d]`
(c_g the input channel of group o // (out / groups)). Two exact paths, picked by a cost model
(`choose_path`) unless the caller names one:

- "sparse": per kernel offset (i, j), the masked elements with that offset are an SDDMM of
  grad_y (T, out) with the input shifted by that offset (T, in): `masked_sddmm` on each, one
  shifted copy of the input alive at a time, nnz * T multiply-adds in all (T = batch x output
  positions): what a linear's masked gradient costs, and no weight-sized tensor;
- "dense": the convolution's own weight gradient (oneDNN / cuDNN GEMMs, in fp32), transient,
  gathered at the indices and freed: out * in * kernel * T multiply-adds at GEMM speed, cheaper
  where the mask is dense enough or the layer small.

`conv_weight_grad_reference` is the test oracle (the dense gradient, gathered).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .masked_sddmm import _CPU_GEMM_MACS, masked_sddmm, path_costs

PATHS = ("sparse", "dense")
# elements per second copied into a shifted input (a strided slice made contiguous); the SDDMMs
# and the dense GEMM use masked_sddmm's CPU rates, so the two models cannot drift apart
_COPY = 3e8


def _dims(x: Tensor) -> int:
    return x.dim() - 2


def _pads(padding: list[int]) -> list[int]:
    """F.pad's order (last dimension first, both sides) for symmetric per-dimension padding."""
    return [p for size in reversed(padding) for p in (size, size)]


def check_conv_args(name: str, x: Tensor, grad_y: Tensor, indices: Tensor, weight_shape: list[int],
                    stride: list[int], padding: list[int], dilation: list[int], groups: int) -> None:
    d = _dims(x)
    if d not in (1, 2, 3) or grad_y.dim() != x.dim():
        raise ValueError(f"{name}: expected x and grad_y of one rank, 3-D to 5-D, found {tuple(x.shape)} "
                         f"and {tuple(grad_y.shape)}")
    for label, v in (("weight_shape", weight_shape[2:]), ("stride", stride), ("padding", padding),
                     ("dilation", dilation)):
        if len(v) != d:
            raise ValueError(f"{name}: {label} must give {d} sizes, found {list(v)}")
    out_c, cg = weight_shape[0], weight_shape[1]
    if groups < 1 or out_c % groups or x.shape[1] != cg * groups or grad_y.shape[1] != out_c:
        raise ValueError(f"{name}: channels do not fit: x {x.shape[1]}, grad_y {grad_y.shape[1]}, weight "
                         f"{list(weight_shape)}, groups {groups}")
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: indices must be 1-D int32/int64, found {indices.dtype} "
                         f"{tuple(indices.shape)}")


def _tokens(grad_y: Tensor) -> int:
    return grad_y.shape[0] * math.prod(grad_y.shape[2:])


def choose_path(device: torch.device | str, x: Tensor, grad_y: Tensor, nnz: int,
                weight_shape: list[int]) -> str:
    """The path the cost model picks: dense on CUDA (cuDNN's weight gradient); on the CPU the
    cheaper of the dense GEMMs and, per kernel offset, one shifted copy of the input and the
    masked SDDMM of its share of the elements (masked_sddmm's own estimate of its best path)."""
    if torch.device(device).type == "cuda":
        return "dense"
    T = _tokens(grad_y)
    kernel = math.prod(weight_shape[2:])
    out_c, in_c = weight_shape[0], x.shape[1]
    per_offset = max(1, math.ceil(nnz / kernel))
    sddmm = min(path_costs("cpu", x.dtype, grad_y.dtype, T, out_c, in_c, per_offset, None).values())
    sparse = kernel * (sddmm + T * in_c / _COPY)
    dense = math.prod(weight_shape) * T / _CPU_GEMM_MACS / max(1, torch.get_num_threads())
    return "sparse" if sparse < dense else "dense"


def _dense(x: Tensor, grad_y: Tensor, indices: Tensor, weight_shape: list[int], stride: list[int],
           padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """The convolution's own weight gradient in fp32, gathered at the indices."""
    grad_w = torch.ops.aten.convolution_backward(
        grad_y.float(), x.float(), torch.empty(weight_shape, device=x.device, dtype=torch.float32),
        None, stride, padding, dilation, False, [0] * _dims(x), groups, [False, True, False])[1]
    return grad_w.reshape(-1)[indices.long()]


def _sparse(x: Tensor, grad_y: Tensor, indices: Tensor, weight_shape: list[int], stride: list[int],
            padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """One SDDMM per kernel offset, on the input shifted by that offset."""
    d = _dims(x)
    out_c, cg, kernel = weight_shape[0], weight_shape[1], weight_shape[2:]
    in_c = cg * groups
    og = out_c // groups
    idx = indices.long()
    k = math.prod(kernel)
    offset, oc = idx % k, idx // k
    o, c_local = oc // cg, oc % cg
    pair = o * in_c + (o // og) * cg + c_local  # into the virtual (out, in) matrix of all channels
    order = torch.argsort(offset * (out_c * in_c) + pair)
    offsets, counts = torch.unique_consecutive(offset[order], return_counts=True)
    gy = grad_y.movedim(1, -1).reshape(-1, out_c)  # (T, out)
    xp = F.pad(x, _pads(padding)) if any(padding) else x
    x_last = xp.movedim(1, -1)  # (N, *spatial, in), a view
    out_sizes = grad_y.shape[2:]
    grads = torch.empty(idx.numel(), dtype=torch.float32, device=x.device)
    start = 0
    for off, n in zip(offsets.tolist(), counts.tolist(), strict=True):
        sel = order[start : start + n]
        start += n
        at = []
        for dim in reversed(range(d)):  # the offset's position along each kernel dimension
            at.append(off % kernel[dim])
            off //= kernel[dim]
        at.reverse()
        region = tuple(slice(at[t] * dilation[t], at[t] * dilation[t] + stride[t] * (out_sizes[t] - 1) + 1,
                             stride[t]) for t in range(d))
        shifted = x_last[(slice(None), *region)].reshape(-1, in_c)  # (T, in), one copy at a time
        grads[sel] = masked_sddmm(gy, shifted, pair[sel], in_c, [])
    return grads


def conv_weight_grad_at(x: Tensor, grad_y: Tensor, indices: Tensor, weight_shape: list[int],
                        stride: list[int], padding: list[int], dilation: list[int], groups: int, *,
                        path: str | None = None) -> Tensor:
    """fp32 `dW.flat[indices]` of a convolution (zero padding `padding` on both sides of each
    spatial dimension; pad the input first for any other padding), by the path the cost model
    picks unless `path` (one of PATHS) says which: the kernel dispatcher of the
    `shira_fx::masked_conv_grad` op. `indices` sorted, unique, into the weight as stored."""
    check_conv_args("conv_weight_grad_at", x, grad_y, indices, weight_shape, stride, padding, dilation,
                    groups)
    if path is not None and path not in PATHS:
        raise ValueError(f"conv_weight_grad_at: path must be one of {PATHS}, found {path!r}")
    if indices.numel() == 0 or _tokens(grad_y) == 0:
        return torch.zeros(indices.numel(), dtype=torch.float32, device=x.device)
    chosen = path or choose_path(x.device, x, grad_y, indices.numel(), weight_shape)
    fn = _sparse if chosen == "sparse" else _dense
    return fn(x, grad_y, indices, weight_shape, stride, padding, dilation, groups)


def conv_weight_grad_reference(x: Tensor, grad_y: Tensor, indices: Tensor, weight_shape: list[int],
                               stride: list[int], padding: list[int], dilation: list[int],
                               groups: int) -> Tensor:
    """The test oracle: autograd's dense weight gradient of the convolution, in fp64, gathered."""
    w = torch.zeros(weight_shape, dtype=torch.float64, device=x.device, requires_grad=True)
    conv = (F.conv1d, F.conv2d, F.conv3d)[_dims(x) - 1]
    y = conv(x.double(), w, None, stride, padding, dilation, groups)
    (grad_w,) = torch.autograd.grad(y, w, grad_y.double())
    return grad_w.reshape(-1)[indices.long()].float()
