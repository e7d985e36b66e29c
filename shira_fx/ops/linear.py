"""Training a linear's fused weight: `sparse_linear` (the dense linear on the fused weight) and
`masked_grad`, the SDDMM its backward sends to the values."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from .autocast import register_autocast
from .checks import INTS, check, check_float, check_linear, check_sparse

# -- the masked gradient -------------------------------------------------------------------


@torch.library.custom_op("shira_fx::masked_grad", mutates_args=())
def masked_grad(a: Tensor, b: Tensor, indices: Tensor, ncols: int, structure: list[Tensor]) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[indices]` for 2-D a (T, A), b (T, B), never forming A×B: the
    mask's structure (`kernels.structure.mask_structure`; empty for none) as dense GEMMs, the
    rest by the fastest exact path for the device and shape (`kernels.masked_sddmm`)."""
    return kernels.masked_sddmm(a, b, indices, ncols, structure)


@masked_grad.register_fake
def _(a, b, indices, ncols, structure):
    op = "masked_grad"
    check(a.dim() == 2 and b.dim() == 2, op,
          f"a and b must be 2-D (T, A) and (T, B), found {tuple(a.shape)} and {tuple(b.shape)}")
    check(a.shape[0] == b.shape[0], op, f"a and b must share T, found {a.shape[0]} and {b.shape[0]}")
    check(b.shape[1] == ncols, op, f"b must have ncols = {ncols} columns, found {b.shape[1]}")
    check_float(op, "a", a)
    check_float(op, "b", b)
    check(b.device == a.device, op, f"b must be on {a.device}, found {b.device}")
    check(indices.dim() == 1 and indices.dtype in INTS, op,
          f"indices must be 1-D int32/int64, found {indices.dtype} of shape {tuple(indices.shape)}")
    check(len(structure) in (0, 7), op, f"a structure holds 7 tensors, found {len(structure)}")
    return a.new_empty(indices.shape[0], dtype=torch.float32)


# -- training on a fused weight ----------------------------------------------------------------


@torch.library.custom_op("shira_fx::sparse_linear", mutates_args=())
def sparse_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, indices: Tensor, transposed: bool,
    structure: list[Tensor],
) -> Tensor:
    """The dense linear on the fused weight; `values` is an input only so it receives a gradient.

    `weight` holds base + values at `indices` (kept so by the sync after every optimizer
    step), so the forward costs exactly what the base model's linear costs. `transposed` marks
    a weight stored (in, out), as GPT-2's Conv1D stores it; `structure` is the mask's, for the
    backward.
    """
    return kernels.dense_linear(x, weight, bias, transposed)


@sparse_linear.register_fake
def _(x, weight, bias, values, indices, transposed, structure):
    out_features = check_linear("sparse_linear", x, weight, bias, transposed)
    check_sparse("sparse_linear", indices, values, x)
    return x.new_empty(*x.shape[:-1], out_features)


register_autocast("sparse_linear")


def _sparse_linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, values, indices, transposed, structure = inputs
    ctx.save_for_backward(x, weight, indices, *structure)
    ctx.transposed = transposed
    ctx.values_dtype = values.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _sparse_linear_backward(ctx, grad_y: Tensor):
    x, weight, indices, *structure = ctx.saved_tensors
    needs_x, _, needs_bias, needs_values = ctx.needs_input_grad[:4]
    out_features = grad_y.shape[-1]
    gy = grad_y.reshape(-1, out_features)
    grad_x = grad_bias = grad_values = None
    if needs_x:
        # grad_x = grad_y @ W for (out, in) storage, grad_y @ W.T for (in, out) storage
        w = (weight.t() if ctx.transposed else weight).to(gy.dtype)
        grad_x = (gy @ w).reshape(x.shape).to(x.dtype)
    if needs_values:
        x2 = x.reshape(-1, x.shape[-1])
        if ctx.transposed:
            grad_values = masked_grad(x2, gy, indices, out_features, structure)
        else:
            grad_values = masked_grad(gy, x2, indices, x2.shape[1], structure)
        grad_values = grad_values.to(ctx.values_dtype)
    if needs_bias and ctx.bias_dtype is not None:
        grad_bias = gy.sum(0).to(ctx.bias_dtype)
    return grad_x, None, grad_bias, grad_values, None, None, [None] * len(structure)


sparse_linear.register_autograd(_sparse_linear_backward, setup_context=_sparse_linear_setup)
