"""The adapted module: what shira_fx puts on a module, declared once, and the forwards it runs.

A trained module holds its adapter's state as its own: the trainable values (a parameter, so
any optimizer built from `model.parameters()` trains it), the indices and base buffers
(non-persistent: `model.state_dict()` keeps the base model's keys) and, in its `__dict__`, its
`ShiraLayer` and the mask's structure. A module a bank serves beside its weight (a quantized
base, or a mixed batch) holds the side path's buffers. Every other module of shira_fx reads
and writes these through the functions here, never by name; `shira_fx.attach` puts the
training state on and takes it off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import ops, quantized, registry
from .adapter_files import LayerSpec, fingerprint
from .errors import ShiraAdapterError, ShiraConfigError

# -- the module protocol ---------------------------------------------------------------------
# training state of one adapted parameter ("weight", or a 3-D experts parameter such as
# "gate_up_proj", whose names get the parameter's name in front: `state_name`)
VALUES, INDICES, BASE = "shira_values", "shira_indices", "shira_base"
# plain attributes in the module's __dict__ (invisible to parameters(), buffers(), state_dict())
LAYER = "_shira_layer"  # the ShiraLayer of the module's "weight"
TRANSPOSED = "_shira_transposed"  # the weight is stored (in, out) (GPT-2's Conv1D)
STRUCTURE = "_shira_structure"  # the mask's structure for the masked gradient (kernels.mask_structure)
EXPOSED = "_shira_exposed"  # {parameter name: ShiraLayer} read through the adapter's property
ORIGINAL_CLASS = "_shira_class"  # the module's class before the adapter's subclass
# served beside the weight by a bank (buffers): the active adapter (quantized bases) ...
SIDE_INDICES, SIDE_VALUES = "shira_side_indices", "shira_side_values"
# ... and a mixed batch's packed table of corrections (indices, values, per-entry offsets)
REQUEST = ("shira_request_indices", "shira_request_values", "shira_request_offsets")
ROWS = "_shira_rows"  # the bank's per-thread rows of a mixed batch
SERVED_TRANSPOSED = "_shira_served_transposed"
SERVED_WEIGHT = "_shira_served_weight"  # "weight" when the CPU runs a mixed batch's whole linear
FORWARD = "forward"  # the instance-level forward shira_fx installs (the class's stays)


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
    stored, the `base` values found there before training (the weight's dtype) and the
    trainable `values` (the delta, fp32 by default)."""

    name: str
    module: nn.Module
    transposed: bool
    param: str = "weight"  # which parameter of the module (e.g. "gate_up_proj" of MoE experts)
    # a quantized base (shira_fx.quantized kind): the adapter rides beside it, never fused
    quantized: str | None = None
    logical: tuple[int, int] | None = field(default=None, repr=False)  # its (out, in)
    # who writes `base + values` when the weight is not a plain tensor of this process
    # (shira_fx.distributed.fully_shard installs one for FSDP2's sharded weights)
    writer: Writer | None = field(default=None, repr=False)
    # the indices, kept on the CPU while the weight has no data yet (prepared on meta)
    pending: Tensor | None = field(default=None, repr=False)
    # (values, indices, base) as they were when the adapter was removed
    removed: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)
    loading: bool = field(default=False, repr=False)  # a state dict with this weight is loading
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

    def fingerprint(self) -> str:
        """Identifies the base model this layer's adapter belongs to (see `fingerprint`)."""
        return fingerprint(self.indices, self.base)

    def spec(self) -> LayerSpec:
        """What an adapter file says about this layer."""
        self.check_ready()
        dtype = self.base.dtype if self.quantized else self.weight.dtype
        return LayerSpec(self.name, self.shape, str(dtype).removeprefix("torch."),
                         self.transposed, int(self.indices.numel()), self.fingerprint())


# -- reading the protocol ----------------------------------------------------------------------


def layer_of(module: nn.Module) -> ShiraLayer | None:
    """The training adapter's layer on this module's `weight`, if it carries one."""
    return module.__dict__.get(LAYER)


def has_training_state(module: nn.Module, param: str) -> bool:
    """Whether parameter `param` of `module` carries an adapter, or the module has attributes
    named like shira_fx's own for it (a name clash prepare refuses)."""
    return (param == "weight" and LAYER in module.__dict__) or any(
        hasattr(module, state_name(param, kind)) for kind in (VALUES, INDICES, BASE))


def structure_of(module: nn.Module) -> list[Tensor]:
    """The mask's structure tensors this module keeps for the masked gradient ([] if none)."""
    return list(module.__dict__.get(STRUCTURE, ()))


def set_structure(module: nn.Module, structure: list[Tensor]) -> None:
    module.__dict__[STRUCTURE] = structure


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


# -- the forwards shira_fx installs --------------------------------------------------------------


def sparse_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Forward of a prepared module: training (grad on, values trainable) goes through
    `sparse_linear`, which reads the fused weight and sends the masked gradient to the values;
    otherwise the module's own dense forward. Compiled, Dynamo lifts the values and indices
    as graph inputs like any parameter, so one graph serves every block of the same shape."""
    values = self._parameters[VALUES]
    weight = self._parameters["weight"]  # the fused weight itself, not the `weight` property
    if not torch.compiler.is_compiling():
        self.__dict__[LAYER].check_ready()
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != weight.dtype and not autocast:  # as the layer itself would refuse
            return type(self).forward(self, x)
    if torch.is_grad_enabled() and values.requires_grad:
        return ops.sparse_linear(x, weight, self.bias, values, self._buffers[INDICES],
                                 getattr(self, TRANSPOSED), getattr(self, STRUCTURE))
    return type(self).forward(self, x)


def side_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Forward of a prepared quantized module: the quantization library's own layer, plus the
    adapter beside it, `x @ S.T` (the packed weight cannot hold base + delta)."""
    y = quantized.base_forward(self, x)
    side = ops.side_linear(x, self._parameters[VALUES], self._buffers[INDICES], y.shape[-1], x.shape[-1])
    return y + side.to(y.dtype)


def served_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Forward of a module a bank serves beside its weight: the layer's own forward (for a
    quantized base, the library's op), plus the active adapter beside it when the weight cannot
    hold it, plus each row's own correction when this thread serves a mixed batch (on the CPU,
    a plain weight's whole linear per adapter: `ops.request_linear`); with neither, exactly the
    base layer's output."""
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
    y = quantized.base_forward(self, x)
    indices = self._buffers[SIDE_INDICES]
    if indices.numel():
        y = y + ops.side_linear(x, self._buffers[SIDE_VALUES], indices, y.shape[-1], x.shape[-1]).to(y.dtype)
    if rows is not None:
        x2 = x.reshape(-1, x.shape[-1])
        seg_starts = torch.arange(rows.numel() + 1, device=x.device) * (x2.shape[0] // rows.numel())
        side = ops.side_segmented(x2, seg_starts, rows, *table, y.shape[-1], x.shape[-1], transposed)
        y = y + side.reshape(y.shape).to(y.dtype)
    return y


def install_forward(module: nn.Module, forward: Callable) -> None:
    module.__dict__[FORWARD] = forward.__get__(module)


def serve_beside(module: nn.Module, rows: object, transposed: bool = False) -> None:
    """Give a module the (empty) side paths a bank fills: the active adapter's for a
    quantized base, each row's correction in a mixed batch (`rows`: the bank's per-thread
    rows, the same object for every layer it serves)."""
    if is_served(module):
        if module.__dict__[ROWS] is not rows:
            raise ShiraAdapterError("AdapterBank: another bank already serves this model's layers; "
                                    "one model takes one bank")
        return
    if layer_of(module) is not None:
        raise ShiraAdapterError("AdapterBank: a layer of this model carries a training adapter; "
                                "call adapter.remove() first")
    device = next((t.device for t in module.parameters()), torch.device("cpu"))
    module.register_buffer(SIDE_INDICES, torch.empty(0, dtype=torch.int32, device=device), persistent=False)
    module.register_buffer(SIDE_VALUES, torch.empty(0, device=device), persistent=False)
    for name, dtype in zip(REQUEST, (torch.int32, torch.float32, torch.int64), strict=True):
        module.register_buffer(name, torch.empty(0, dtype=dtype, device=device), persistent=False)
    module.__dict__[ROWS] = rows
    module.__dict__[SERVED_TRANSPOSED] = transposed
    # a plain weight (not quantized): on the CPU a mixed batch runs the whole linear per adapter
    weight = module._parameters.get("weight")
    plain = (isinstance(module, nn.Linear) or transposed) and quantized.quantized_kind(module) is None and (
        type(weight) is nn.Parameter)
    module.__dict__[SERVED_WEIGHT] = "weight" if plain else None
    install_forward(module, served_forward)


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


def _adapted_parameter(name: str) -> property:
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


def expose(module: nn.Module, layer: ShiraLayer) -> None:
    """Route every read of an adapted parameter through `_ParamWithValues`: the module's class
    becomes a subclass with a property per adapted parameter (one subclass per class and set
    of parameters, shared by every block); the state dict and the parameter stay as they were."""
    params = module.__dict__.setdefault(EXPOSED, {})
    if not params:
        module.__dict__[ORIGINAL_CLASS] = type(module)
    params[layer.param] = layer
    module.__class__ = _with_properties(module.__dict__[ORIGINAL_CLASS], frozenset(params))


def unexpose(module: nn.Module, param: str) -> None:
    params = module.__dict__.get(EXPOSED, {})
    params.pop(param, None)
    original = module.__dict__.get(ORIGINAL_CLASS, type(module))
    if params:
        module.__class__ = _with_properties(original, frozenset(params))
    else:
        module.__class__ = original
        module.__dict__.pop(EXPOSED, None)
        module.__dict__.pop(ORIGINAL_CLASS, None)


_SUBCLASSES: dict[tuple[type, frozenset], type] = {}


def _with_properties(original: type, params: frozenset) -> type:
    key = (original, params)
    if key not in _SUBCLASSES:
        attrs = {p: _adapted_parameter(p) for p in sorted(params)}
        if "weight" in params:
            attrs["_apply"] = _apply_keeping_structure
        # named as the original, but of this module: Dynamo compiles torch.nn's own classes
        # with every tensor attribute at a fixed size, which would pin the structure's sizes
        _SUBCLASSES[key] = type(original.__name__, (original,),
                                {**attrs, "__module__": __name__, "__qualname__": original.__qualname__})
    return _SUBCLASSES[key]


def _apply_keeping_structure(self: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """`Module._apply` (`.to`, `.cuda`, `to_empty`, FSDP2's moves), then the mask's structure
    follows the indices to their device as a buffer would."""
    result = super(type(self), self)._apply(fn, recurse)
    structure, indices = structure_of(self), self._buffers.get(INDICES)
    if structure and indices is not None and structure[0].device != indices.device:
        set_structure(self, on_device(structure, indices.device))
    return result


def on_device(structure: list[Tensor], device: torch.device) -> list[Tensor]:
    """The structure's tensors on `device`, sizes marked unbacked: blocks whose structures
    differ in size still share one compiled graph."""
    moved = [t.to(device) for t in structure]
    for t in moved:
        torch._dynamo.decorators.mark_unbacked(t, 0)
    return moved
