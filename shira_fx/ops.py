"""torch.library custom ops: the functional training op and the mutating scatter op.

Two kinds of op (DESIGN.md invariant 4): autograd cannot be registered on a mutating op, so
training goes through the functional `sparse_linear` (forward: the dense linear on the fused
weight; backward: grad_x plus the masked gradient through `masked_grad`), while syncing and
switching go through the mutating `scatter_`, always outside autograd. Each op runs the Triton
kernel on CUDA and a torch implementation on CPU.
"""


import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import scatter_fused_, scatter_fused_reference_, sddmm, sddmm_cpu


def _dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    if not transposed:
        return F.linear(x, weight, bias)
    y = x.reshape(-1, x.shape[-1]) @ weight
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[1])


@torch.library.custom_op("shira_fx::masked_grad", mutates_args=())
def masked_grad(a: Tensor, b: Tensor, indices: Tensor, ncols: int) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[indices]` for 2-D a (T, A), b (T, B), never forming A×B."""
    if a.is_cuda:
        return sddmm(a, b, indices, ncols)
    return sddmm_cpu(a, b, indices, ncols)


@masked_grad.register_fake
def _(a: Tensor, b: Tensor, indices: Tensor, ncols: int) -> Tensor:
    return a.new_empty(indices.shape[0], dtype=torch.float32)


@torch.library.custom_op("shira_fx::sparse_linear", mutates_args=())
def sparse_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, indices: Tensor, transposed: bool
) -> Tensor:
    """The dense linear on the fused weight; `values` is an input only so it receives a gradient.

    `weight` holds base + values at `indices` (kept so by `SparseAdapter.sync`), so the forward
    costs exactly what the base model's linear costs. `transposed` marks a weight stored
    (in, out), as GPT-2's Conv1D stores it.
    """
    return _dense_linear(x, weight, bias, transposed)


@sparse_linear.register_fake
def _(x, weight, bias, values, indices, transposed):
    out_features = weight.shape[1] if transposed else weight.shape[0]
    return x.new_empty(*x.shape[:-1], out_features)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, values, indices, transposed = inputs
    ctx.save_for_backward(x, weight, indices)
    ctx.transposed = transposed
    ctx.values_dtype = values.dtype
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y: Tensor):
    x, weight, indices = ctx.saved_tensors
    needs_x, _, needs_bias, needs_values, _, _ = ctx.needs_input_grad
    out_features = grad_y.shape[-1]
    gy = grad_y.reshape(-1, out_features)
    grad_x = grad_bias = grad_values = None
    if needs_x:
        # grad_x = grad_y @ W for (out, in) storage, grad_y @ W.T for (in, out) storage
        w = weight.t() if ctx.transposed else weight
        grad_x = (gy @ w).reshape(x.shape)
    if needs_values:
        x2 = x.reshape(-1, x.shape[-1])
        if ctx.transposed:
            grad_values = masked_grad(x2, gy, indices, out_features)
        else:
            grad_values = masked_grad(gy, x2, indices, x2.shape[1])
        grad_values = grad_values.to(ctx.values_dtype)
    if needs_bias and ctx.has_bias:
        grad_bias = gy.sum(0)
    return grad_x, None, grad_bias, grad_values, None, None


sparse_linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("shira_fx::scatter_", mutates_args=("weights",))
def scatter_(
    weights: list[Tensor], indices: list[Tensor], base: list[Tensor], delta: list[Tensor], scale: float
) -> None:
    """In place, per layer: `W.flat[idx] = base + scale * delta` (or `base` when delta is empty).

    Assigns rather than accumulates, so the fused weights never drift from `base + values`,
    and restoring the saved base values is bit-exact. Touches only the indexed elements.
    """
    if not weights:
        return
    deltas = delta if delta else None
    if weights[0].is_cuda:
        scatter_fused_(weights, indices, base, deltas, scale)
    else:
        scatter_fused_reference_(weights, indices, base, deltas, scale)


@scatter_.register_fake
def _(weights, indices, base, delta, scale) -> None:
    return None
