"""Training on a quantized base: the adapter beside a weight that is never dequantized
(`side_linear`, `side_grad_x`), and one GEMM on the dequantized weight with the delta written in
(`dequantized_linear`, `dequantized_grad_x`)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from ..quantized import DEQUANTIZING_KINDS
from .autocast import register_autocast
from .checks import check, check_float, check_sparse
from .linear import masked_grad

# -- the adapter beside a weight that cannot hold it -----------------------------------------------


@torch.library.custom_op("shira_fx::side_linear", mutates_args=())
def side_linear(x: Tensor, values: Tensor, indices: Tensor, out_features: int, in_features: int) -> Tensor:
    """`x @ S.T` for the sparse delta S (`S.flat[indices] = values`, an (out, in) matrix): the
    adapter's path beside a layer whose weight cannot hold it (a quantized base). Costs
    nnz * tokens multiply-adds (`kernels.side_product`); the values' gradient is the masked
    gradient as always."""
    return kernels.side_product(x, indices, values, out_features, in_features)


def _side_fake(op: str, name: str, src: Tensor, values: Tensor, indices: Tensor, features: tuple) -> Tensor:
    """The side ops' fake: `src` ends in `features[0]` (named `features[1]`), the result in
    `features[2]`."""
    have, label, result = features
    check(src.dim() >= 1 and src.shape[-1] == have, op,
          f"{name} must end in {label} = {have}, found shape {tuple(src.shape)}")
    check_float(op, name, src)
    check_sparse(op, indices, values, src)
    return src.new_empty(*src.shape[:-1], result)


@side_linear.register_fake
def _(x, values, indices, out_features, in_features):
    return _side_fake("side_linear", "x", x, values, indices, (in_features, "in_features", out_features))


@torch.library.custom_op("shira_fx::side_grad_x", mutates_args=())
def side_grad_x(grad_y: Tensor, values: Tensor, indices: Tensor, out_features: int,
                in_features: int) -> Tensor:
    """`grad_y @ S`, `side_linear`'s input gradient, as an op of its own so a compiled backward
    keeps it opaque (its CPU path reads the CSR bounds back, which tracing cannot)."""
    return kernels.side_product_t(grad_y, indices, values, out_features, in_features)


@side_grad_x.register_fake
def _(grad_y, values, indices, out_features, in_features):
    return _side_fake("side_grad_x", "grad_y", grad_y, values, indices,
                      (out_features, "out_features", in_features))


def _side_setup(ctx, inputs, output) -> None:
    x, values, indices, out_features, in_features = inputs
    ctx.save_for_backward(x, values, indices)
    ctx.shape = (out_features, in_features)


def _side_backward(ctx, grad_y: Tensor):
    x, values, indices = ctx.saved_tensors
    needs_x, needs_values = ctx.needs_input_grad[:2]
    out_features, in_features = ctx.shape
    gy = grad_y.reshape(-1, out_features)
    grad_x = grad_values = None
    if needs_x:
        grad_x = side_grad_x(gy, values, indices, out_features, in_features).reshape(x.shape).to(x.dtype)
    if needs_values:
        grad_values = masked_grad(gy, x.reshape(-1, in_features), indices, in_features, []).to(values.dtype)
    return grad_x, grad_values, None, None, None


side_linear.register_autograd(_side_backward, setup_context=_side_setup)


# -- one GEMM on a quantized layer's dequantized weight ---------------------------------------------


def _check_packed(op: str, src: Tensor, packed: list[Tensor], kind: str, meta: list[int]) -> tuple[int, int]:
    """A dequantizing kind's packed tensors and meta (`quantized.dequantizing`); (out, in)."""
    check(kind in DEQUANTIZING_KINDS, op,
          f"kind must be one of {sorted(DEQUANTIZING_KINDS)}, found {kind!r}")
    tensors, ints = DEQUANTIZING_KINDS[kind]
    check(len(packed) in tensors and len(meta) - 2 in ints, op,
          f"a {kind} weight takes {tensors} packed tensors and [out, in] plus {ints} meta integers, "
          f"found {len(packed)} tensors and meta {list(meta)}")
    check(meta[0] >= 1 and meta[1] >= 1, op, f"meta must start with out, in >= 1, found {list(meta[:2])}")
    for i, t in enumerate(packed):
        check(t.device == src.device, op, f"packed[{i}] must be on {src.device}, found {t.device}")
    return meta[0], meta[1]


@torch.library.custom_op("shira_fx::dequantized_linear", mutates_args=())
def dequantized_linear(x: Tensor, packed: list[Tensor], bias: Tensor | None, values: Tensor, indices: Tensor,
                       kind: str, meta: list[int], structure: list[Tensor]) -> Tensor:
    """The training linear of a quantized layer that computes by dequantizing its weight
    (`quantized.dequantizing` gives `packed`, `kind`, `meta`): one GEMM on the dense transient
    with the delta written in, `x @ (dequantize(packed) + S).T + bias` (`kernels.delta_linear`);
    the packed weight is only read. Backward rebuilds the transient for grad_x (as the library's
    own backward does; nothing weight-sized is saved) and sends the masked gradient to the
    values; `structure` is the mask's, for it. Operands in `sparse_linear`'s order (x, weight,
    bias, values, indices), so the backend's pass finds both alike."""
    return kernels.delta_linear(x, packed, bias, values, indices, kind, meta)


@dequantized_linear.register_fake
def _(x, packed, bias, values, indices, kind, meta, structure):
    op = "dequantized_linear"
    out_features, in_features = _check_packed(op, x, packed, kind, meta)
    check(x.dim() >= 1 and x.shape[-1] == in_features, op,
          f"x must end in the weight's {in_features} input features, found shape {tuple(x.shape)}")
    check_float(op, "x", x)
    if bias is not None:
        check(bias.dim() == 1 and bias.shape[0] == out_features, op,
              f"bias must have shape ({out_features},), found {tuple(bias.shape)}")
    check_sparse(op, indices, values, x)
    check(len(structure) in (0, 7), op, f"a structure holds 7 tensors, found {len(structure)}")
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("shira_fx::dequantized_grad_x", mutates_args=())
def dequantized_grad_x(grad_y: Tensor, packed: list[Tensor], values: Tensor, indices: Tensor, kind: str,
                       meta: list[int]) -> Tensor:
    """`grad_y @ (dequantize(packed) + S)`, `dequantized_linear`'s input gradient on the transient
    rebuilt (`kernels.delta_grad_x`), an op of its own so a compiled backward keeps the library's
    dequantize opaque."""
    return kernels.delta_grad_x(grad_y, packed, values, indices, kind, meta)


@dequantized_grad_x.register_fake
def _(grad_y, packed, values, indices, kind, meta):
    op = "dequantized_grad_x"
    out_features, in_features = _check_packed(op, grad_y, packed, kind, meta)
    check(grad_y.dim() == 2 and grad_y.shape[1] == out_features, op,
          f"grad_y must be (T, out_features = {out_features}), found shape {tuple(grad_y.shape)}")
    check_float(op, "grad_y", grad_y)
    check_sparse(op, indices, values, grad_y)
    return grad_y.new_empty(grad_y.shape[0], in_features)


def _dequantized_setup(ctx, inputs, output) -> None:
    x, packed, bias, values, indices, kind, meta, structure = inputs
    ctx.save_for_backward(x, values, indices, *packed, *structure)
    ctx.layer = (kind, list(meta), len(packed), len(structure))
    ctx.bias_dtype = None if bias is None else bias.dtype


def _dequantized_backward(ctx, grad_y: Tensor):
    x, values, indices, *rest = ctx.saved_tensors
    kind, meta, n_packed, n_structure = ctx.layer
    packed, structure = rest[:n_packed], rest[n_packed:]
    needs = ctx.needs_input_grad
    needs_x, needs_bias, needs_values = needs[0], needs[2], needs[3]
    out_features, in_features = meta[0], meta[1]
    gy = grad_y.reshape(-1, out_features)
    grad_x = grad_bias = grad_values = None
    if needs_x:
        grad_x = dequantized_grad_x(gy, packed, values, indices, kind, meta).reshape(x.shape).to(x.dtype)
    if needs_values:
        grad_values = masked_grad(gy, x.reshape(-1, in_features), indices, in_features, structure)
        grad_values = grad_values.to(values.dtype)
    if needs_bias and ctx.bias_dtype is not None:
        grad_bias = gy.sum(0).to(ctx.bias_dtype)
    return grad_x, [None] * n_packed, grad_bias, grad_values, None, None, None, [None] * n_structure


dequantized_linear.register_autograd(_dequantized_backward, setup_context=_dequantized_setup)
register_autocast("dequantized_linear")
