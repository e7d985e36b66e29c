"""The adapted module: what shira_fx puts on a module, declared once, and the forwards it runs.

A trained module holds its adapter's state as its own: the trainable values (a parameter, so
any optimizer built from `model.parameters()` trains it), the indices and base buffers
(non-persistent) and, in its `__dict__`, its `ShiraLayer`s and the mask's structure. A module
a bank serves beside its weight (a quantized base, or a mixed batch) holds the side path's
buffers. Either way its class becomes a shira_fx subclass of its own (`shira_fx.attach` makes
it) whose `forward` is one of the forwards here and which keeps that state right through
everything nn.Module allows (copies, pickling, casts, state dicts). Every other module of
shira_fx reads and writes the state through the functions here, never by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, quantized, registry
from .adapter_files import LayerSpec, fingerprint
from .errors import ShiraAdapterError, ShiraConfigError

# -- the module protocol ---------------------------------------------------------------------
# training state of one adapted parameter ("weight", or a 3-D experts parameter such as
# "gate_up_proj", whose names get the parameter's name in front: `state_name`)
VALUES, INDICES, BASE = "shira_values", "shira_indices", "shira_base"
# plain attributes in the module's __dict__ (invisible to parameters(), buffers(), state_dict())
LAYERS = "_shira_layers"  # {parameter name: ShiraLayer}, one per adapted parameter
TRANSPOSED = "_shira_transposed"  # the weight is stored (in, out) (GPT-2's Conv1D)
STRUCTURE = "_shira_structure"  # the mask's structure for the masked gradient (kernels.structure)
# served beside the weight by a bank (buffers): the active adapter (quantized bases) ...
SIDE_INDICES, SIDE_VALUES = "shira_side_indices", "shira_side_values"
# ... and a mixed batch's packed table of corrections (indices, values, per-entry offsets)
REQUEST = ("shira_request_indices", "shira_request_values", "shira_request_offsets")
ROWS = "_shira_rows"  # the bank's per-thread rows of a mixed batch
SERVED_TRANSPOSED = "_shira_served_transposed"
SERVED_WEIGHT = "_shira_served_weight"  # "weight" when the CPU runs a mixed batch's whole linear
# on a prepared model (the root `prepare` was given): one record per prepare, so a copy of the
# model can rebuild its adapter (`SparseAdapter.of`): {"cfg", "layers": names, "frozen": names}
PREPARED = "_shira_prepared"
# class attributes of a shira_fx subclass (`shira_fx.attach.adapted_class`)
ORIGINAL = "_shira_original"  # the class it adapts
ROLE = "_shira_role"  # which forward it runs: "sparse", "side", "served" or None (its own)
EXPOSED = "_shira_exposed"  # the parameters read through the adapter's property


def state_name(param: str, kind: str) -> str:
    """The module attribute holding `kind` (VALUES, INDICES or BASE) of adapted parameter
    `param`: a module with several adapted parameters keeps them apart by parameter name."""
    return kind if param == "weight" else f"{param}_{kind}"


# (layer) -> (weight, indices, base, values) that this process writes into; see write_target
Writer = Callable[["ShiraLayer"], tuple[Tensor, Tensor, Tensor, Tensor]]


@dataclass(eq=False)
class ShiraLayer:
    """One adapted weight. Its state lives on its module (so `model.to(...)` moves it and
    `model.parameters()` holds the values): flat sorted int32 `indices` into the weight as
    stored, the `base` values found there before training (at the weight's precision then)
    and the trainable `values` (the delta, fp32 by default)."""

    name: str
    module: nn.Module
    transposed: bool
    param: str = "weight"  # which parameter of the module (e.g. "gate_up_proj" of MoE experts)
    # a quantized base (shira_fx.quantized kind): the adapter rides beside it, never fused
    quantized: str | None = None
    conv: bool = False  # a convolution's (out, in / groups, *kernel) weight
    logical: tuple[int, int] | None = field(default=None, repr=False)  # its (out, in)
    # who writes `base + values` when the weight is not a plain tensor of this process
    # (shira_fx.distributed.fully_shard installs one for FSDP2's sharded weights)
    writer: Writer | None = field(default=None, repr=False)
    # the indices, kept on the CPU while the weight has no data yet (prepared on meta)
    pending: Tensor | None = field(default=None, repr=False)
    # (values, indices, base) as they were when the adapter was removed
    removed: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)
    compiled: bool = field(default=False, repr=False)  # a compiled training graph holds it

    def attr(self, kind: str) -> str:
        return state_name(self.param, kind)

    @property
    def weight(self) -> Tensor:
        return self.module._parameters[self.param]

    @property
    def values(self) -> nn.Parameter:
        return self.removed[0] if self.removed else self.module._parameters[self.attr(VALUES)]

    @property
    def indices(self) -> Tensor:
        return self.removed[1] if self.removed else self.module._buffers[self.attr(INDICES)]

    @property
    def base(self) -> Tensor:
        return self.removed[2] if self.removed else self.module._buffers[self.attr(BASE)]

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape as the indices address it (a quantized weight's logical one)."""
        return self.logical if self.quantized else tuple(self.weight.shape)

    def check_ready(self) -> None:
        """Refuse to compute with a layer whose weights never arrived (prepared on meta)."""
        if self.pending is not None:
            raise ShiraConfigError(
                f"layer {self.name!r}: the model was prepared on the meta device and its weights "
                "have not been loaded; call model.to_empty(device=...) and then "
                "model.load_state_dict(...) (or load the weights another way and call "
                "adapter.materialize())"
            )

    def write_target(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(weight, indices, base, values) that this process writes `base + values` into: the
        whole layer, or for a sharded weight what its writer says, so the fused weight stays
        the single source of truth under FSDP2 too."""
        self.check_ready()
        if self.writer is not None:
            return self.writer(self)
        if registry.is_dtensor(self.weight):
            raise ShiraConfigError(
                f"layer {self.name!r}: the weight was sharded without shira_fx; use "
                "shira_fx.distributed.fully_shard, which also averages the values' gradients"
            )
        return self.weight, self.indices, self.base, self.values

    def rounds_values(self) -> bool:
        """Whether the fused weight stores the values' dtype: then a training step leaves the
        values at what the weight holds over the base (`sync`), and the weight alone gives
        them back (fp32 masters of bf16/fp16 weights keep their precision instead)."""
        return not self.quantized and self.weight.dtype == self.values.dtype

    def held_exactly(self) -> bool:
        """Whether the fused weight gives the values back bit for bit (`values == W[idx] -
        base`): then `state_dict` needs only the weight. A quantized weight never holds them;
        a sharded one is checked through the rounding alone (every rank holds the base)."""
        if self.pending is not None or self.removed or not self.rounds_values() or self.weight.is_meta:
            return False
        values = self.values.detach()
        base = self.base.to(values.dtype)
        with torch.no_grad():
            if registry.is_dtensor(self.weight):
                held = (base + values).to(self.weight.dtype) - base
            else:
                held = self.weight.detach().reshape(-1)[self.indices.long()] - base
            return torch.equal(held, values)

    def fingerprint(self) -> str:
        """Identifies the base model this layer's adapter belongs to (see `fingerprint`): the
        base values as the weight now stores them."""
        return fingerprint(self.indices, self.base.to(self._stored_dtype()))

    def _stored_dtype(self) -> torch.dtype:
        return self.base.dtype if self.quantized else self.weight.dtype

    def spec(self) -> LayerSpec:
        """What an adapter file says about this layer."""
        self.check_ready()
        return LayerSpec(self.name, self.shape, str(self._stored_dtype()).removeprefix("torch."),
                         self.transposed, int(self.indices.numel()), self.fingerprint())


@torch.no_grad()
def sync(layers: Iterable[ShiraLayer], round_values: bool = False) -> None:
    """`W.flat[idx] = base + values` for these layers, in one fused scatter (a quantized layer
    has nothing to write: its adapter rides beside the packed weight).

    `round_values` (an optimizer step): where the weight stores the values' dtype, the values
    first become exactly what the weight will hold over the base (`(base + values) - base`,
    the fused value's own rounding: what training that weight densely keeps), so the fused
    weight alone gives them back bit for bit and a plain state dict resumes exactly; computed
    from the base and the values alone, it is the same on every rank of a sharded model.
    fp32 masters of bf16/fp16 weights keep their precision."""
    layers = [layer for layer in layers if not layer.quantized]
    if round_values:
        for layer in layers:
            if layer.pending is None and layer.rounds_values():
                base = layer.base.to(layer.values.dtype)
                layer.values.add_(base).sub_(base)  # (base + values) - base, in place
    targets = [layer.write_target() for layer in layers]
    if targets:
        ops.scatter_weights_(*([t[i] for t in targets] for i in range(4)))


# -- reading the protocol ----------------------------------------------------------------------


def layers_of(module: nn.Module) -> dict[str, ShiraLayer]:
    """The training adapter's layers on this module, by parameter name ({} if none)."""
    return module.__dict__.get(LAYERS, {})


def layer_of(module: nn.Module) -> ShiraLayer | None:
    """The training adapter's layer on this module's `weight`, if it carries one."""
    return layers_of(module).get("weight")


def has_training_state(module: nn.Module, param: str) -> bool:
    """Whether parameter `param` of `module` carries an adapter, or the module has attributes
    named like shira_fx's own for it (a name clash prepare refuses)."""
    return param in layers_of(module) or any(
        hasattr(module, state_name(param, kind)) for kind in (VALUES, INDICES, BASE))


def structure_of(module: nn.Module) -> list[Tensor]:
    """The mask's structure tensors this module keeps for the masked gradient ([] if none)."""
    return list(module.__dict__.get(STRUCTURE, ()))


def set_structure(module: nn.Module, structure: list[Tensor]) -> None:
    module.__dict__[STRUCTURE] = structure


def on_device(structure: list[Tensor], device: torch.device) -> list[Tensor]:
    """The structure's tensors on `device`, sizes marked unbacked: blocks whose structures
    differ in size still share one compiled graph."""
    moved = [t.to(device) for t in structure]
    for t in moved:
        torch._dynamo.decorators.mark_unbacked(t, 0)
    return moved


def original_class(module: nn.Module) -> type:
    """The class of the module before shira_fx adapted it (its own class if it never was)."""
    return getattr(type(module), ORIGINAL, type(module))


def own_forward(module: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    """The module's own forward, by its original class: the quantization library's op for a
    quantized base, whatever shira_fx installed over it; no hooks."""
    return original_class(module).forward(module, x, *args, **kwargs)


def is_served(module: nn.Module) -> bool:
    return SIDE_INDICES in module._buffers


def rows_of(module: nn.Module) -> object:
    """The per-thread rows object of the bank serving this module."""
    return module.__dict__[ROWS]


def beside_weight(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(indices, values) of the adapter riding beside a module's weight: its training adapter
    on a quantized base, else the bank's active side path; None when there is none."""
    layer = layer_of(module)
    if layer is not None and layer.quantized:
        return layer.indices, layer.values
    if is_served(module) and module._buffers[SIDE_INDICES].numel():
        return module._buffers[SIDE_INDICES], module._buffers[SIDE_VALUES]
    return None


def set_side(module: nn.Module, indices: Tensor, values: Tensor) -> None:
    """The bank's active adapter beside a served module's weight (empty tensors: none)."""
    module._buffers[SIDE_INDICES], module._buffers[SIDE_VALUES] = indices, values


def served_device(module: nn.Module) -> torch.device:
    return module._buffers[SIDE_INDICES].device


def set_request_table(module: nn.Module, indices: Tensor, values: Tensor, offsets: Tensor) -> None:
    """A mixed batch's packed corrections on a served module: entry a is
    `indices/values[offsets[a]:offsets[a+1]]`."""
    for name, tensor in zip(REQUEST, (indices, values, offsets), strict=True):
        module._buffers[name] = tensor


# -- the forwards of shira_fx's subclasses -----------------------------------------------------


def sparse_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Forward of a prepared module: training (grad on, values trainable) goes through
    `sparse_linear`, which reads the fused weight and sends the masked gradient to the values;
    otherwise the module's own dense forward. Compiled, Dynamo lifts the values and indices
    as graph inputs like any parameter, so one graph serves every block of the same shape."""
    if _trains(self, x):
        return ops.sparse_linear(x, self._parameters["weight"], self.bias, self._parameters[VALUES],
                                 self._buffers[INDICES], getattr(self, TRANSPOSED), getattr(self, STRUCTURE))
    return own_forward(self, x)


def _trains(self: nn.Module, x: Tensor) -> bool:
    """Whether a prepared module's forward trains through shira_fx's op: grad on and the values
    trainable, the layer ready, and x of the fused weight's dtype or under autocast (else the
    module's own forward runs, refusing a mismatch as the layer itself would)."""
    if not torch.compiler.is_compiling():
        self.__dict__[LAYERS]["weight"].check_ready()
        if x.dtype != self._parameters["weight"].dtype and not torch.is_autocast_enabled(x.device.type):
            return False
    return torch.is_grad_enabled() and self._parameters[VALUES].requires_grad


def conv_forward(self: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    """Forward of a prepared convolution: training goes through `sparse_conv` on the fused
    weight (the input padded first unless the padding is symmetric zeros, so the op sees one
    geometry), otherwise the module's own convolution."""
    if not _trains(self, x):
        return own_forward(self, x, *args, **kwargs)
    values = self._parameters[VALUES]
    weight = self._parameters["weight"]
    dims = weight.dim() - 2
    if self.padding_mode != "zeros" or isinstance(self.padding, str):
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
        padding = [0] * dims
    else:
        padding = list(self.padding)
    return ops.sparse_conv(x, weight, self.bias, values, self._buffers[INDICES], list(self.stride), padding,
                           list(self.dilation), self.groups)


def _dequantized_forward(module: nn.Module, x: Tensor, plan: quantized.Dequantizing, values: Tensor,
                         indices: Tensor, structure: list[Tensor]) -> Tensor:
    """One GEMM on a quantized layer's dequantized weight with the delta written in, the input
    cast as the layer itself casts it (bitsandbytes 4-bit: to its compute dtype, and the output
    back)."""
    if plan.compute_dtype is None:
        return ops.dequantized_linear(x, plan.packed, module.bias, values, indices, plan.kind, plan.meta,
                                      structure)
    y = ops.dequantized_linear(x.to(plan.compute_dtype), plan.packed, module.bias, values, indices, plan.kind,
                               plan.meta, structure)
    return y.to(x.dtype)


def side_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Forward of a prepared quantized module. Where the layer computes by dequantizing its
    weight into a dense transient (`quantized.dequantizing`), one GEMM each way on that
    transient with the delta written in (`ops.dequantized_linear`: the frozen base's cost);
    otherwise the quantization library's own layer plus the adapter beside it, `x @ S.T` (the
    packed weight cannot hold base + delta)."""
    values, indices = self._parameters[VALUES], self._buffers[INDICES]
    plan = quantized.dequantizing(self, x)
    if plan is not None:
        return _dequantized_forward(self, x, plan, values, indices, self.__dict__[STRUCTURE])
    y = own_forward(self, x)
    side = ops.side_linear(x, values, indices, y.shape[-1], x.shape[-1])
    return y + side.to(y.dtype)


def served_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Forward of a module a bank serves beside its weight: the layer's own forward (for a
    quantized base, the library's op), plus the active adapter beside it when the weight cannot
    hold it (on the CPU, a layer that computes by dequantizing runs one GEMM with the active
    adapter written into its transient instead; on CUDA bitsandbytes' inference kernels never
    form one), plus each row's own correction when this thread serves a mixed batch (on the
    CPU, a plain weight's whole linear per adapter: `ops.request_linear`); with neither, exactly
    the base layer's output."""
    rows = getattr(self.__dict__[ROWS], "rows", None)
    if rows is not None:
        if x.shape[0] != rows.numel():
            raise ShiraAdapterError(f"per_request: a served layer got an input of shape {tuple(x.shape)}; "
                                    f"expected the batch's {rows.numel()} rows first")
        rows = rows.to(x.device)
    weight = self.__dict__[SERVED_WEIGHT]
    table = [self._buffers[name] for name in REQUEST]
    transposed = self.__dict__[SERVED_TRANSPOSED]
    if rows is not None and weight is not None and x.device.type == "cpu":  # the whole linear per adapter
        return ops.request_linear(x, self._parameters[weight], self.bias, rows, *table, transposed)
    indices = self._buffers[SIDE_INDICES]
    plan = quantized.dequantizing(self, x) if indices.numel() and x.device.type == "cpu" else None
    if plan is not None:
        y = _dequantized_forward(self, x, plan, self._buffers[SIDE_VALUES], indices, [])
    else:
        y = own_forward(self, x)
        if indices.numel():
            side = ops.side_linear(x, self._buffers[SIDE_VALUES], indices, y.shape[-1], x.shape[-1])
            y = y + side.to(y.dtype)
    if rows is not None:
        x2 = x.reshape(-1, x.shape[-1])
        seg_starts = torch.arange(rows.numel() + 1, device=x.device) * (x2.shape[0] // rows.numel())
        side = ops.side_segmented(x2, seg_starts, rows, *table, y.shape[-1], x.shape[-1], transposed)
        y = y + side.reshape(y.shape).to(y.dtype)
    return y


FORWARDS = {"sparse": sparse_forward, "conv": conv_forward, "side": side_forward, "served": served_forward}


# -- the adapter's property on adapted parameters ---------------------------------------------


class _ParamWithValues(torch.autograd.Function):
    """An adapted weight read by the model's own code (a 3-D experts parameter in a loop of
    per-expert matmuls or a grouped GEMM; a linear's weight read outside its forward, e.g.
    `dt_proj.weight @ x` or `F.multi_head_attention_forward(..., out_proj.weight)`): the fused
    weight as it is, whose gradient at the mask goes to the values. Autograd forms the
    dense gradient of that use and this gathers it at the indices (the backend's pass turns
    the usual forms, `x @ W.T`, `W @ y`, `F.linear`, back into the sparse op)."""

    @staticmethod
    def forward(ctx, weight: Tensor, values: Tensor, indices: Tensor) -> Tensor:
        ctx.save_for_backward(indices)
        ctx.values_dtype = values.dtype
        return weight.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (indices,) = ctx.saved_tensors
        return None, grad.reshape(-1)[indices.long()].to(ctx.values_dtype), None


def adapted_parameter(name: str) -> property:
    """The property reading parameter `name` of a prepared module (names fixed per parameter:
    compiled code touches no per-layer Python object, so blocks share their graph)."""
    values_attr, indices_attr = state_name(name, VALUES), state_name(name, INDICES)

    def read(self: nn.Module) -> Tensor:
        weight = self._parameters[name]
        values = self._parameters[values_attr]
        if torch.is_grad_enabled() and values.requires_grad:
            return _ParamWithValues.apply(weight, values, self._buffers[indices_attr])
        return weight

    return property(read, doc=f"{name}, with its SHiRA values in the autograd graph")
