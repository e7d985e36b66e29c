"""Training a convolution's fused weight: `sparse_conv` and its masked weight gradient
`masked_conv_grad`."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from .autocast import register_autocast
from .checks import INTS, check, check_float, check_sparse

# -- training a convolution's fused weight ------------------------------------------------------------

_CONVS = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}


def _check_conv(op: str, x: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                dilation: list[int], groups: int) -> None:
    d = weight.dim() - 2
    check(d in _CONVS and x.dim() == d + 2, op,
          f"x ({tuple(x.shape)}) and weight ({tuple(weight.shape)}) must be a {d}-D convolution's")
    check(len(stride) == d and len(padding) == d and len(dilation) == d, op,
          f"stride, padding and dilation must give {d} sizes each")
    check(groups >= 1 and x.shape[1] == weight.shape[1] * groups and weight.shape[0] % groups == 0, op,
          f"x has {x.shape[1]} channels; the weight {tuple(weight.shape)} in {groups} group(s) wants "
          f"{weight.shape[1] * groups}")
    check_float(op, "x", x)
    check(weight.device == x.device, op, f"weight must be on {x.device}, found {weight.device}")


@torch.library.custom_op("shira_fx::masked_conv_grad", mutates_args=())
def masked_conv_grad(x: Tensor, grad_y: Tensor, indices: Tensor, weight_shape: list[int], stride: list[int],
                     padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """fp32 `dW.flat[indices]` of a convolution, without keeping a dense weight gradient
    (`kernels.conv_weight_grad_at`: per kernel offset an SDDMM, or the transient dense one)."""
    return kernels.conv_weight_grad_at(x, grad_y, indices, weight_shape, stride, padding, dilation, groups)


@masked_conv_grad.register_fake
def _(x, grad_y, indices, weight_shape, stride, padding, dilation, groups):
    op = "masked_conv_grad"
    check(x.dim() == grad_y.dim() == len(weight_shape), op,
          f"x {tuple(x.shape)}, grad_y {tuple(grad_y.shape)} and weight_shape {list(weight_shape)} "
          "must have one rank")
    check(grad_y.shape[1] == weight_shape[0], op,
          f"grad_y has {grad_y.shape[1]} channels, the weight {weight_shape[0]} outputs")
    check(indices.dim() == 1 and indices.dtype in INTS, op, "indices must be 1-D int32/int64")
    return x.new_empty(indices.shape[0], dtype=torch.float32)


@torch.library.custom_op("shira_fx::sparse_conv", mutates_args=())
def sparse_conv(x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, indices: Tensor,
                stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """The convolution on the fused weight (zero padding, symmetric; pad the input first for
    any other); `values` is an input only so it receives the masked gradient (as in
    `sparse_linear`)."""
    bias = None if bias is None else bias.to(x.dtype)
    return _CONVS[weight.dim() - 2](x, weight.to(x.dtype), bias, stride, padding, dilation, groups)


@sparse_conv.register_fake
def _(x, weight, bias, values, indices, stride, padding, dilation, groups):
    op = "sparse_conv"
    _check_conv(op, x, weight, stride, padding, dilation, groups)
    check_sparse(op, indices, values, x)
    sizes = [(x.shape[2 + t] + 2 * padding[t] - dilation[t] * (weight.shape[2 + t] - 1) - 1) // stride[t] + 1
             for t in range(weight.dim() - 2)]
    return x.new_empty(x.shape[0], weight.shape[0], *sizes)


def _sparse_conv_setup(ctx, inputs, output) -> None:
    x, weight, bias, values, indices, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, indices)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.values_dtype = values.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _sparse_conv_backward(ctx, grad_y: Tensor):
    x, weight, indices = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    needs_x, _, needs_bias, needs_values = ctx.needs_input_grad[:4]
    grad_x = grad_bias = grad_values = None
    if needs_x:
        grad_x = torch.ops.aten.convolution_backward(
            grad_y, x, weight.to(grad_y.dtype), None, stride, padding, dilation, False, [0] * len(stride),
            groups, [True, False, False])[0].to(x.dtype)
    if needs_values:
        grad_values = masked_conv_grad(x, grad_y, indices, list(weight.shape), stride, padding, dilation,
                                       groups).to(ctx.values_dtype)
    if needs_bias and ctx.bias_dtype is not None:
        grad_bias = grad_y.sum([0, *range(2, grad_y.dim())]).to(ctx.bias_dtype)
    return grad_x, None, grad_bias, grad_values, None, None, None, None, None


sparse_conv.register_autograd(_sparse_conv_backward, setup_context=_sparse_conv_setup)
register_autocast("sparse_conv")
