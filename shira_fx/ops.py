"""The `shira_fx::` torch.library ops: schema, fake kernel, autograd and autocast of each.

Two kinds (autograd cannot be registered on a mutating op): functional ops that train or
serve (`sparse_linear`: the dense linear on the fused weight, whose backward sends the masked
gradient `masked_grad` to the values; `dequantized_linear` / `dequantized_grad_x`: one GEMM on a
quantized layer's dequantized weight with the delta written in; `side_linear` / `side_grad_x`:
the adapter beside a quantized weight that is never dequantized; `request_linear`,
`side_segmented`: mixed batches), and the mutating
`scatter_` for sync and switching, always outside autograd. Each op's real kernel is one
dispatcher of `shira_fx.kernels` (Triton on CUDA, torch on the CPU). Every fake kernel checks
its operands' shapes, dtypes and devices with `torch._check`, naming the operand, so a wrong
call fails at trace time with a message instead of deep inside generated code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .quantized import DEQUANTIZING_KINDS

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INTS = (torch.int32, torch.int64)


def _check(cond: bool, op: str, message: str) -> None:
    torch._check(cond, lambda: f"shira_fx::{op}: {message}")


def _check_float(op: str, name: str, t: Tensor) -> None:
    _check(t.dtype in _FLOATS, op, f"{name} must be a float tensor, found {t.dtype}")


def _check_sparse(op: str, indices: Tensor, values: Tensor, like: Tensor) -> None:
    """1-D int indices and as many float values, on `like`'s device."""
    _check(indices.dim() == 1 and indices.dtype in _INTS, op,
           f"indices must be 1-D int32/int64, found {indices.dtype} of shape {tuple(indices.shape)}")
    _check(values.dim() == 1, op, f"values must be 1-D, found shape {tuple(values.shape)}")
    _check(values.shape[0] == indices.shape[0], op,
           f"values ({values.shape[0]}) and indices ({indices.shape[0]}) must have one entry each")
    _check_float(op, "values", values)
    for name, t in (("indices", indices), ("values", values)):
        _check(t.device == like.device, op, f"{name} must be on {like.device}, found {t.device}")


def _check_linear(op: str, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> int:
    """A linear's operands; returns its out_features."""
    _check(weight.dim() == 2, op, f"weight must be 2-D, found shape {tuple(weight.shape)}")
    in_features, out_features = weight.shape if transposed else (weight.shape[1], weight.shape[0])
    _check(x.dim() >= 1 and x.shape[-1] == in_features, op,
           f"x must end in the weight's {in_features} input features, found shape {tuple(x.shape)}")
    _check_float(op, "x", x)
    _check_float(op, "weight", weight)
    _check(weight.device == x.device, op, f"weight must be on {x.device}, found {weight.device}")
    if bias is not None:
        _check(bias.dim() == 1 and bias.shape[0] == out_features, op,
               f"bias must have shape ({out_features},), found {tuple(bias.shape)}")
    return out_features


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
    _check(a.dim() == 2 and b.dim() == 2, op,
           f"a and b must be 2-D (T, A) and (T, B), found {tuple(a.shape)} and {tuple(b.shape)}")
    _check(a.shape[0] == b.shape[0], op, f"a and b must share T, found {a.shape[0]} and {b.shape[0]}")
    _check(b.shape[1] == ncols, op, f"b must have ncols = {ncols} columns, found {b.shape[1]}")
    _check_float(op, "a", a)
    _check_float(op, "b", b)
    _check(b.device == a.device, op, f"b must be on {a.device}, found {b.device}")
    _check(indices.dim() == 1 and indices.dtype in _INTS, op,
           f"indices must be 1-D int32/int64, found {indices.dtype} of shape {tuple(indices.shape)}")
    _check(len(structure) in (0, 7), op, f"a structure holds 7 tensors, found {len(structure)}")
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
    out_features = _check_linear("sparse_linear", x, weight, bias, transposed)
    _check_sparse("sparse_linear", indices, values, x)
    return x.new_empty(*x.shape[:-1], out_features)


def _autocast_kernel(op: str, device_type: str):
    """Autocast for a training op (`sparse_linear`, `sparse_conv`): x is cast to the autocast
    dtype of the moment (bf16 or fp16, whichever the user's autocast region asks for), the
    weight stays as it is (the op casts it), and the values stay fp32 so their gradient is
    accumulated in fp32."""
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def kernel(_keyset, x, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            if x.is_floating_point() and x.device.type == device_type and x.dtype != dtype:
                x = x.to(dtype)
            return getattr(torch.ops.shira_fx, op).default(x, *args)

    return kernel


_LIB = torch.library.Library("shira_fx", "IMPL")


def _register_autocast(op: str) -> None:
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        _LIB.impl(op, _autocast_kernel(op, device_type), key, with_keyset=True)


_register_autocast("sparse_linear")


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


# -- training a convolution's fused weight ------------------------------------------------------------

_CONVS = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}


def _check_conv(op: str, x: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                dilation: list[int], groups: int) -> None:
    d = weight.dim() - 2
    _check(d in _CONVS and x.dim() == d + 2, op,
           f"x ({tuple(x.shape)}) and weight ({tuple(weight.shape)}) must be a {d}-D convolution's")
    _check(len(stride) == d and len(padding) == d and len(dilation) == d, op,
           f"stride, padding and dilation must give {d} sizes each")
    _check(groups >= 1 and x.shape[1] == weight.shape[1] * groups and weight.shape[0] % groups == 0, op,
           f"x has {x.shape[1]} channels; the weight {tuple(weight.shape)} in {groups} group(s) wants "
           f"{weight.shape[1] * groups}")
    _check_float(op, "x", x)
    _check(weight.device == x.device, op, f"weight must be on {x.device}, found {weight.device}")


@torch.library.custom_op("shira_fx::masked_conv_grad", mutates_args=())
def masked_conv_grad(x: Tensor, grad_y: Tensor, indices: Tensor, weight_shape: list[int], stride: list[int],
                     padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """fp32 `dW.flat[indices]` of a convolution, without keeping a dense weight gradient
    (`kernels.conv_weight_grad_at`: per kernel offset an SDDMM, or the transient dense one)."""
    return kernels.conv_weight_grad_at(x, grad_y, indices, weight_shape, stride, padding, dilation, groups)


@masked_conv_grad.register_fake
def _(x, grad_y, indices, weight_shape, stride, padding, dilation, groups):
    op = "masked_conv_grad"
    _check(x.dim() == grad_y.dim() == len(weight_shape), op,
           f"x {tuple(x.shape)}, grad_y {tuple(grad_y.shape)} and weight_shape {list(weight_shape)} "
           "must have one rank")
    _check(grad_y.shape[1] == weight_shape[0], op,
           f"grad_y has {grad_y.shape[1]} channels, the weight {weight_shape[0]} outputs")
    _check(indices.dim() == 1 and indices.dtype in _INTS, op, "indices must be 1-D int32/int64")
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
    _check_sparse(op, indices, values, x)
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
_register_autocast("sparse_conv")


# -- sync and switching ----------------------------------------------------------------------


@torch.library.custom_op("shira_fx::scatter_", mutates_args=("weights",))
def scatter_(
    weights: list[Tensor], indices: list[Tensor], base: list[Tensor], delta: list[Tensor], scale: float
) -> None:
    """In place, per layer: `W.flat[idx] = base + scale * delta` (or `base` when delta is empty).

    Assigns rather than accumulates, so the fused weights never drift from `base + values`,
    and restoring the saved base values is bit-exact. Touches only the indexed elements.
    """
    kernels.scatter_layers_(weights, indices, base, delta or None, scale)


@scatter_.register_fake
def _(weights, indices, base, delta, scale) -> None:
    op = "scatter_"
    _check(len(indices) == len(weights) and len(base) == len(weights) and len(delta) in (0, len(weights)),
           op, f"one entry per layer in every list, found {len(weights)} weights, {len(indices)} "
           f"indices, {len(base)} base, {len(delta)} delta")
    for i, (w, idx, b) in enumerate(zip(weights, indices, base, strict=True)):
        _check(idx.dim() == 1 and idx.dtype in _INTS, op, f"indices[{i}] must be 1-D int32/int64")
        _check(b.shape == idx.shape and b.dtype.is_floating_point, op,
               f"base[{i}] must be a float tensor of shape {tuple(idx.shape)}, found {b.dtype} "
               f"{tuple(b.shape)}")
        if delta:
            _check(delta[i].shape == idx.shape, op, f"delta[{i}] must have shape {tuple(idx.shape)}")
        for name, t in (("indices", idx), ("base", b)):
            _check(t.device == w.device, op, f"{name}[{i}] must be on {w.device}, found {t.device}")
    return None


def scatter_weights_(
    weights: list[Tensor], indices: list[Tensor], base: list[Tensor], delta: list[Tensor] | None,
    scale: float = 1.0,
) -> None:
    """`W.flat[idx] = base + scale * delta` (or `base`) for every layer, in place. Eagerly this
    calls the kernels directly (the dispatcher's cost over many layers' tensors is
    noticeable); under torch.compile it is the registered mutating op, so Inductor sees the
    mutation."""
    if torch.compiler.is_compiling():
        torch.ops.shira_fx.scatter_(weights, indices, base, delta or [], scale)
    else:
        kernels.scatter_layers_(weights, indices, base, delta or None, scale)


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
    _check(src.dim() >= 1 and src.shape[-1] == have, op,
           f"{name} must end in {label} = {have}, found shape {tuple(src.shape)}")
    _check_float(op, name, src)
    _check_sparse(op, indices, values, src)
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
    _check(kind in DEQUANTIZING_KINDS, op,
           f"kind must be one of {sorted(DEQUANTIZING_KINDS)}, found {kind!r}")
    tensors, ints = DEQUANTIZING_KINDS[kind]
    _check(len(packed) in tensors and len(meta) - 2 in ints, op,
           f"a {kind} weight takes {tensors} packed tensors and [out, in] plus {ints} meta integers, "
           f"found {len(packed)} tensors and meta {list(meta)}")
    _check(meta[0] >= 1 and meta[1] >= 1, op, f"meta must start with out, in >= 1, found {list(meta[:2])}")
    for i, t in enumerate(packed):
        _check(t.device == src.device, op, f"packed[{i}] must be on {src.device}, found {t.device}")
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
    _check(x.dim() >= 1 and x.shape[-1] == in_features, op,
           f"x must end in the weight's {in_features} input features, found shape {tuple(x.shape)}")
    _check_float(op, "x", x)
    if bias is not None:
        _check(bias.dim() == 1 and bias.shape[0] == out_features, op,
               f"bias must have shape ({out_features},), found {tuple(bias.shape)}")
    _check_sparse(op, indices, values, x)
    _check(len(structure) in (0, 7), op, f"a structure holds 7 tensors, found {len(structure)}")
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
    _check(grad_y.dim() == 2 and grad_y.shape[1] == out_features, op,
           f"grad_y must be (T, out_features = {out_features}), found shape {tuple(grad_y.shape)}")
    _check_float(op, "grad_y", grad_y)
    _check_sparse(op, indices, values, grad_y)
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
_register_autocast("dequantized_linear")


# -- mixed batches (inference) -------------------------------------------------------------------


def _check_table(op: str, indices: Tensor, values: Tensor, offsets: Tensor, like: Tensor) -> None:
    _check_sparse(op, indices, values, like)
    _check(offsets.dim() == 1 and offsets.dtype in _INTS and offsets.shape[0] >= 1, op,
           f"offsets must be 1-D int32/int64 with at least one entry, found {offsets.dtype} "
           f"of shape {tuple(offsets.shape)}")


@torch.library.custom_op("shira_fx::request_linear", mutates_args=())
def request_linear(x: Tensor, weight: Tensor, bias: Tensor | None, row_adapters: Tensor, indices: Tensor,
                   values: Tensor, offsets: Tensor, transposed: bool) -> Tensor:
    """A mixed batch's whole linear on the CPU, for inference: batch row b (x's first
    dimension) computes with `weight` plus adapter `row_adapters[b]`'s correction (-1: none),
    correction a being `indices/values[offsets[a]:offsets[a+1]]` (`kernels.mixed_linear_cpu`)."""
    return kernels.mixed_linear_cpu(x, weight, bias, row_adapters, indices, values, offsets, transposed)


@request_linear.register_fake
def _(x, weight, bias, row_adapters, indices, values, offsets, transposed):
    op = "request_linear"
    out_features = _check_linear(op, x, weight, bias, transposed)
    _check(x.dim() >= 2, op, f"x must be (batch, ..., in), found shape {tuple(x.shape)}")
    _check(row_adapters.dim() == 1 and row_adapters.dtype in _INTS and row_adapters.shape[0] == x.shape[0],
           op, f"row_adapters must be 1-D ints, one per batch row ({x.shape[0]}), found "
           f"{row_adapters.dtype} of shape {tuple(row_adapters.shape)}")
    _check_table(op, indices, values, offsets, x)
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("shira_fx::side_segmented", mutates_args=())
def side_segmented(x: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor, values: Tensor,
                   offsets: Tensor, out_features: int, in_features: int, transposed: bool) -> Tensor:
    """A mixed batch's side path, for inference: rows `[seg_starts[i], seg_starts[i+1])` of the
    2-D `x` get `x @ S_a.T` with adapter a = `seg_adapters[i]` (-1: none), adapter a's delta
    being `indices/values[offsets[a]:offsets[a+1]]`. Which adapter each row uses is data, not
    shape: a new list of requests compiles nothing. `transposed`: a weight stored (in, out)."""
    return kernels.segmented_side_product(x, seg_starts, seg_adapters, indices, values, offsets,
                                          out_features, in_features, transposed)


@side_segmented.register_fake
def _(x, seg_starts, seg_adapters, indices, values, offsets, out_features, in_features, transposed):
    op = "side_segmented"
    _check(x.dim() == 2 and x.shape[1] == in_features, op,
           f"x must be (T, in_features = {in_features}), found shape {tuple(x.shape)}")
    _check_float(op, "x", x)
    for name, t in (("seg_starts", seg_starts), ("seg_adapters", seg_adapters)):
        _check(t.dim() == 1 and t.dtype in _INTS, op, f"{name} must be 1-D int32/int64")
    _check(seg_starts.shape[0] == seg_adapters.shape[0] + 1, op,
           f"seg_starts must have one more entry than seg_adapters ({seg_adapters.shape[0] + 1}), "
           f"found {seg_starts.shape[0]}")
    _check_table(op, indices, values, offsets, x)
    return x.new_empty(x.shape[0], out_features)
