"""One adapted weight on its module (`ShiraLayer`) and everything done to that module.

The module holds the adapter's state: the trainable `shira_values` (a parameter, so any
optimizer built from `model.parameters()` trains it) and the `shira_indices` and `shira_base`
buffers (non-persistent: `model.state_dict()` keeps the base model's keys). Its forward
routes training through `sparse_linear` (a quantized layer: the sparse side path beside
the library's layer), and every other read of the weight goes through a property that puts
the values in autograd. `shira_fx.adapter` builds these layers for a whole model.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import kernels, ops, quantized, registry
from .adapter_files import LayerSpec, fingerprint
from .config import ShiraConfig
from .errors import ShiraConfigError
from .targets import TargetLayer

VALUES, INDICES, BASE = "shira_values", "shira_indices", "shira_base"
VALUES_PARAMETER = VALUES  # the values' name on their module

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

    def attr(self, kind: str) -> str:
        """The module attribute holding this layer's `kind` (VALUES, INDICES or BASE): a
        module with several adapted parameters keeps them apart by parameter name."""
        return kind if self.param == "weight" else f"{self.param}_{kind}"

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

    @torch.no_grad()
    def weight_arrived(self) -> None:
        """The weight was (re)loaded. On a layer prepared on meta, capture the base values
        there and start from zero values; otherwise the fused weight stays the truth: the
        values become what it now holds over the base (`load_state_dict(model.state_dict())`
        round-trips)."""
        weight = self.weight
        if weight.is_meta:
            return
        # a sharded (FSDP2) weight is gathered once here: every rank keeps the whole base
        full = weight.full_tensor() if registry.is_dtensor(weight) else weight
        if self.pending is not None:
            idx = self.pending.to(full.device)
            self.module._buffers[self.attr(INDICES)] = idx
            self.module._buffers[self.attr(BASE)] = full.detach().reshape(-1)[idx.long()].clone()
            if self.param == "weight":  # planned again from the indices now in place
                self.module._shira_plan = _plan(idx, tuple(full.shape))
            self.values.zero_()
            self.pending = None
        else:
            fused = full.detach().reshape(-1)[self.indices.long()]
            self.values.copy_(fused.to(self.values.dtype) - self.base.to(self.values.dtype))
        registry.register(weight, self)
        registry.register(self.values, self)


def _sparse_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Forward of a prepared module: training (grad on, values trainable) goes through
    `sparse_linear`, which reads the fused weight and sends the masked gradient to the values;
    otherwise the module's own dense forward. Compiled, Dynamo lifts the values and indices
    as graph inputs like any parameter, so one graph serves every block of the same shape."""
    values = self.shira_values
    weight = self._parameters["weight"]  # the fused weight itself, not the `weight` property
    if not torch.compiler.is_compiling():
        self.__dict__["_shira_layer"].check_ready()
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != weight.dtype and not autocast:  # as the layer itself would refuse
            return type(self).forward(self, x)
    if torch.is_grad_enabled() and values.requires_grad:
        return ops.sparse_linear(x, weight, self.bias, values, self.shira_indices, self._shira_transposed,
                                 self._shira_plan)
    return type(self).forward(self, x)


def _side_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Forward of a prepared quantized module: the quantization library's own layer, plus the
    adapter beside it, `x @ S.T` (the packed weight cannot hold base + delta)."""
    y = quantized.base_forward(self, x)
    side = ops.side_linear(x, self.shira_values, self.shira_indices, y.shape[-1], x.shape[-1])
    return y + side.to(y.dtype)


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
    values_attr = VALUES if name == "weight" else f"{name}_{VALUES}"
    indices_attr = INDICES if name == "weight" else f"{name}_{INDICES}"

    def read(self: nn.Module) -> Tensor:
        weight = self._parameters[name]
        values = self._parameters[values_attr]
        if torch.is_grad_enabled() and values.requires_grad:
            return _ParamWithValues.apply(weight, values, self._buffers[indices_attr])
        return weight

    return property(read, doc=f"{name}, with its SHiRA values in the autograd graph")


def _expose(module: nn.Module, layer: ShiraLayer) -> None:
    """Route every read of an adapted parameter through `_ParamWithValues`: the module's class
    becomes a subclass with a property per adapted parameter (one subclass per class and set
    of parameters, shared by every block); the state dict and the parameter stay as they were."""
    params = module.__dict__.setdefault("_shira_params", {})
    if not params:
        module.__dict__["_shira_class"] = type(module)
    params[layer.param] = layer
    module.__class__ = _with_properties(module.__dict__["_shira_class"], frozenset(params))


_SUBCLASSES: dict[tuple[type, frozenset], type] = {}


def _with_properties(original: type, params: frozenset) -> type:
    key = (original, params)
    if key not in _SUBCLASSES:
        attrs = {p: _adapted_parameter(p) for p in sorted(params)}
        if "weight" in params:
            attrs["_apply"] = _apply_keeping_plan
        # named as the original, but of this module: Dynamo compiles torch.nn's own classes
        # with every tensor attribute at a fixed size, which would pin the plan's sizes
        _SUBCLASSES[key] = type(original.__name__, (original,),
                                {**attrs, "__module__": __name__, "__qualname__": original.__qualname__})
    return _SUBCLASSES[key]


def _unexpose(module: nn.Module, param: str) -> None:
    params = module.__dict__.get("_shira_params", {})
    params.pop(param, None)
    original = module.__dict__.get("_shira_class", type(module))
    if params:
        module.__class__ = _with_properties(original, frozenset(params))
    else:
        module.__class__ = original
        module.__dict__.pop("_shira_params", None)
        module.__dict__.pop("_shira_class", None)


def state_dict_hooks(layer: ShiraLayer) -> list:
    """The module's state-dict hooks (handles, for `remove`): its state dict leaves out the
    values (the fused weight already holds them), and loading a weight re-reads them."""
    module = layer.module
    return [module.register_state_dict_post_hook(_drop_values_key(layer)),
            module.register_load_state_dict_pre_hook(_loading(layer)),
            module.register_load_state_dict_post_hook(_loaded(layer))]


def _drop_values_key(layer: ShiraLayer) -> Callable:
    def hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        state_dict.pop(prefix + layer.attr(VALUES), None)

    return hook


def _loading(layer: ShiraLayer) -> Callable:
    def hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        layer.loading = prefix + layer.param in state_dict

    return hook


def _loaded(layer: ShiraLayer) -> Callable:
    def hook(module: nn.Module, incompatible_keys) -> None:
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not k.endswith(VALUES)]
        if layer.loading:
            layer.loading = False
            layer.weight_arrived()

    return hook


@torch.no_grad()
def sync_layers(layers: Iterable[ShiraLayer]) -> None:
    """`W.flat[idx] = base + values` for these layers, in one fused scatter (a quantized layer
    has nothing to write: its adapter rides beside the packed weight)."""
    targets = [layer.write_target() for layer in layers if not layer.quantized]
    if targets:
        ops.scatter_weights_(*([t[i] for t in targets] for i in range(4)))



def _plan(indices: Tensor, shape: tuple[int, ...]) -> list[Tensor]:
    """The mask's structure for the masked gradient (dense rows, columns and diagonals as
    GEMMs, the rest tile-ordered: `kernels.plan_mask`), built once from the indices; a mask
    without structure worth using gets `kernels.no_plan`'s empty tensors. Kept as a plain
    attribute (not buffers, which Dynamo compiles at fixed sizes) with sizes marked unbacked:
    blocks whose plans differ in size still share one compiled graph."""
    plan = kernels.plan_mask(indices, shape[0], shape[1]) or kernels.no_plan(indices)
    return _on_device(plan, indices.device)


def _apply_keeping_plan(self: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """`Module._apply` (`.to`, `.cuda`, `to_empty`, FSDP2's moves), then the plan follows the
    indices to their device as a buffer would."""
    result = super(type(self), self)._apply(fn, recurse)
    plan, indices = self.__dict__.get("_shira_plan"), self._buffers.get(INDICES)
    if plan and indices is not None and plan[0].device != indices.device:
        self.__dict__["_shira_plan"] = _on_device(plan, indices.device)
    return result


def _on_device(plan: list[Tensor], device: torch.device) -> list[Tensor]:
    moved = [t.to(device) for t in plan]
    for t in moved:
        torch._dynamo.decorators.mark_unbacked(t, 0)
    return moved


@torch.no_grad()
def _attach_beside(t: TargetLayer, idx: Tensor, cfg: ShiraConfig) -> ShiraLayer:
    """A quantized module: the adapter's state beside the packed weight, and the forward that
    adds the sparse side path to the library's own layer. The base values (for the file's
    fingerprint) are read from the dequantized weight, one layer at a time."""
    module = t.module
    dense = t.dense_weight()
    device = dense.device
    idx = idx.to(device)
    layer = ShiraLayer(t.name, module, False, quantized=t.quantized, logical=tuple(t.shape))
    values = nn.Parameter(torch.zeros(idx.numel(), dtype=cfg.torch_values_dtype, device=device))
    module.register_parameter(VALUES, values)
    module.register_buffer(INDICES, idx, persistent=False)
    module.register_buffer(BASE, dense.reshape(-1)[idx.long()].clone(), persistent=False)
    del dense
    module._shira_layer = layer
    module.forward = types.MethodType(_side_forward, module)
    registry.register(values, layer)
    registry.register(t.weight, layer)
    return layer


@torch.no_grad()
def attach(t: TargetLayer, mask: Tensor, cfg: ShiraConfig) -> ShiraLayer:
    """Give one targeted module its adapter state and the SHiRA forward."""
    module, w = t.module, t.weight
    idx = mask.to(dtype=torch.int32)
    if t.quantized:
        return _attach_beside(t, idx, cfg)
    layer = ShiraLayer(t.name, module, t.transposed, t.param)
    # on meta (no data yet) the adapter's state waits on the CPU for the weights to arrive: a
    # CPU parameter keeps its identity through `to_empty` (a meta one would be replaced, and
    # with it whatever holds it: the registry, an optimizer, FSDP2's gradient hooks)
    device = torch.device("cpu") if w.is_meta else w.device
    if w.is_meta:
        layer.pending = idx
        base = torch.zeros(idx.numel(), dtype=w.dtype)
    else:
        idx = idx.to(device)
        base = w.detach().view(-1)[idx.long()].clone()
    values = nn.Parameter(torch.zeros(idx.numel(), dtype=cfg.torch_values_dtype, device=device))
    module.register_parameter(layer.attr(VALUES), values)
    module.register_buffer(layer.attr(INDICES), idx.to(device), persistent=False)
    module.register_buffer(layer.attr(BASE), base, persistent=False)
    if t.param == "weight":
        module._shira_layer = layer
        module._shira_transposed = t.transposed
        module._shira_plan = _plan(idx.to(device) if layer.pending is None else layer.pending, tuple(w.shape))
        module.forward = types.MethodType(_sparse_forward, module)
    _expose(module, layer)
    registry.register(values, layer)
    if not w.is_meta:
        registry.register(w, layer)
    return layer


def detach(layer: ShiraLayer) -> None:
    """Take the adapter's state off the module (the layer keeps a copy in `removed`) and
    give the module back its own forward and class. The weight is not written here."""
    module = layer.module
    layer.removed = (layer.values.detach(), layer.indices, layer.base)
    module._parameters.pop(layer.attr(VALUES), None)
    module._buffers.pop(layer.attr(INDICES), None)
    module._buffers.pop(layer.attr(BASE), None)
    if layer.param == "weight":
        for attr in ("forward", "_shira_layer", "_shira_transposed", "_shira_plan"):
            module.__dict__.pop(attr, None)
    if not layer.quantized:
        _unexpose(module, layer.param)
