"""Putting an adapter on a module and taking it off, and the class that keeps it right.

`attach` gives a targeted module its training state (`shira_fx.layer` declares it) and
`serve_beside` a bank's side paths; both make the module's class a shira_fx subclass of its
own class (`adapted_class`, one per class, parameters and role, shared by every block). That
subclass owns the module's whole life: its `forward`; `_apply` (`.to(dtype)` casts the fused
weight but keeps the values and the saved base at their precision, then re-syncs); its state
dict (the values appear there exactly when the fused weight cannot give them back bit for
bit, and a loaded weight brings the values back); copies and pickling (a `copy.deepcopy` or
an unpickled model is a prepared model of its own, its tensors registered for its optimizer
hooks). `detach` gives the module back its own class.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from . import quantized, registry
from .config import ShiraConfig
from .errors import ShiraAdapterError, ShiraWarning
from .kernels.structure import mask_structure, no_structure
from .layer import (
    BASE,
    EXPOSED,
    FORWARDS,
    INDICES,
    LAYERS,
    ORIGINAL,
    REQUEST,
    ROLE,
    ROWS,
    SERVED_TRANSPOSED,
    SERVED_WEIGHT,
    SIDE_INDICES,
    SIDE_VALUES,
    STRUCTURE,
    TRANSPOSED,
    VALUES,
    ShiraLayer,
    adapted_parameter,
    is_served,
    layer_of,
    layers_of,
    on_device,
    original_class,
    set_structure,
    sync,
)
from .targets import TargetLayer

# -- the subclass ------------------------------------------------------------------------------

_CLASSES: dict[tuple[type, frozenset, str | None], type] = {}


def adapted_class(original: type, exposed: frozenset[str], role: str | None) -> type:
    """The shira_fx subclass of `original` whose `forward` is `role`'s (layer.FORWARDS; None:
    the class's own) and whose `exposed` parameters read through the adapter's property.
    Named as the original but of this package: Dynamo compiles torch.nn's own classes with
    every tensor attribute at a fixed size, which would pin the structure's sizes."""
    key = (original, exposed, role)
    if key not in _CLASSES:
        attrs = {p: adapted_parameter(p) for p in sorted(exposed)}
        if role is not None:
            attrs["forward"] = FORWARDS[role]
        attrs.update({ORIGINAL: original, ROLE: role, EXPOSED: exposed, "__module__": __name__,
                      "__qualname__": original.__qualname__, "_apply": _apply,
                      "_save_to_state_dict": _save_to_state_dict,
                      "_load_from_state_dict": _load_from_state_dict,
                      "__reduce_ex__": _reduce_ex, "__setstate__": _setstate})
        _CLASSES[key] = type(original.__name__, (original,), attrs)
    return _CLASSES[key]


def _set_class(module: nn.Module, exposed: frozenset[str] = frozenset(), role: str | None = None) -> None:
    """Give `module` the subclass for these parameters and role (its own class when neither)."""
    original = original_class(module)
    module.__class__ = adapted_class(original, exposed, role) if exposed or role else original


def _rebuild(original: type, exposed: frozenset[str], role: str | None) -> nn.Module:
    """An empty instance of the subclass, for pickle and deepcopy (`__setstate__` fills it)."""
    cls = adapted_class(original, exposed, role)
    return cls.__new__(cls)


def _reduce_ex(self: nn.Module, protocol: int):
    cls = type(self)
    return _rebuild, (getattr(cls, ORIGINAL), getattr(cls, EXPOSED), getattr(cls, ROLE)), self.__dict__.copy()


def _setstate(self: nn.Module, state: dict) -> None:
    """After a deep copy or an unpickling: this module's layers are new objects over new
    tensors; register them, so the optimizer hooks and the backend find this copy's layers."""
    super(type(self), self).__setstate__(state)
    for layer in layers_of(self).values():
        if layer.module is not self:  # a shallow copy shares the original's layers
            continue
        registry.register(layer.values, layer)
        if layer.pending is None and not layer.weight.is_meta:
            registry.register(layer.weight, layer)
    if structure_tensors := self.__dict__.get(STRUCTURE):
        set_structure(self, on_device(structure_tensors, structure_tensors[0].device))


def _apply(self: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """`Module._apply` (`.to`, `.half()`, `.cuda`, `to_empty`, FSDP2's moves), keeping the
    adapter's state as the config asked: the values (and their gradients) and the saved base
    move with the module but keep their dtypes (fp32 masters stay fp32 when the weights
    become bf16; the base stays at the weights' original precision), the mask's structure
    follows the indices, and a weight whose dtype changed is synced again (one rounding of
    base + values into the new dtype)."""
    layers = layers_of(self)
    kept = {p: (layer.values.data, layer.values.grad, layer.base, layer.weight.dtype)
            for p, layer in layers.items() if not layer.removed}
    result = super(type(self), self)._apply(fn, recurse)
    resync = []
    for p, (values, grad, base, weight_dtype) in kept.items():
        layer = layers[p]
        now = layer.values
        if now.dtype != values.dtype:
            now.data = values.to(now.device)
        if grad is not None and now.grad is not None and now.grad.dtype != grad.dtype:
            now.grad = grad.to(now.grad.device)
        if layer.base.dtype != base.dtype:
            self._buffers[layer.attr(BASE)] = base.to(layer.base.device)
        registry.register(now, layer)
        if layer.pending is None and not layer.quantized:
            registry.register(layer.weight, layer)
            if layer.weight.dtype != weight_dtype and not layer.weight.is_meta:
                resync.append(layer)
    structure, indices = self.__dict__.get(STRUCTURE), self._buffers.get(INDICES)
    if structure and indices is not None and structure[0].device != indices.device:
        set_structure(self, on_device(structure, indices.device))
    sync(resync)
    return result


def _save_to_state_dict(self: nn.Module, destination: dict, prefix: str, keep_vars: bool) -> None:
    """The module's own state dict, with each layer's values only when its fused weight cannot
    give them back bit for bit (a quantized base; fp32 masters of bf16/fp16 weights), so an
    fp32 model's state dict is the plain merged model and every state dict round-trips (a
    layer prepared on meta has no values before its weights arrive)."""
    super(type(self), self)._save_to_state_dict(destination, prefix, keep_vars)
    for layer in layers_of(self).values():  # a layer whose weights never arrived has no values yet
        if layer.pending is not None or layer.held_exactly():
            destination.pop(prefix + layer.attr(VALUES), None)


def _load_from_state_dict(self: nn.Module, state_dict: dict, prefix: str, local_metadata, strict: bool,
                          missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Load as the module would, then: values found in the state dict are taken as they are
    (the fused weight synced to them); a weight without its values brings the values back
    from what it holds over the base (exact for a state dict shira_fx wrote); a layer prepared
    on meta takes its base values from the weight that arrived."""
    layers = layers_of(self)
    brought = {p: (prefix + p in state_dict, _values_in(state_dict.get(prefix + layer.attr(VALUES)), layer))
               for p, layer in layers.items()}
    super(type(self), self)._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                  missing_keys, unexpected_keys, error_msgs)
    values_keys = {prefix + layer.attr(VALUES) for layer in layers.values()}
    missing_keys[:] = [k for k in missing_keys if k not in values_keys]
    for p, (weight_came, values) in brought.items():
        if weight_came or values == "loaded":
            weight_arrived(layers[p], values)


def _values_in(values: Tensor | None, layer: ShiraLayer) -> str | None:
    """What a state dict holds of the layer's values: "loaded" (values to take), "own" (the
    layer's own tensor: a loader that fills what it lacks from the model's own state dict, as
    torch's distributed checkpoint does, or the model's state dict loaded back) or None."""
    if not isinstance(values, Tensor):
        return None
    own = layer.values
    shared = values.untyped_storage().data_ptr() == own.untyped_storage().data_ptr()
    return "own" if shared and values.device == own.device else "loaded"


@torch.no_grad()
def weight_arrived(layer: ShiraLayer, values: str | None = None) -> None:
    """The weight was (re)loaded, with the values `values` says (`_values_in`). On a layer
    prepared on meta, capture the base values there and start from zero values (or from
    values loaded with it); with values, sync the fused weight to them; otherwise the fused
    weight stays the truth: the values become what it now holds over the base (bit for bit
    where a training step kept it so; a warning where the weight's dtype cannot hold them; a
    quantized weight holds none: its values stay as they were)."""
    weight = layer.weight
    if weight.is_meta:
        return
    # a sharded (FSDP2) weight is gathered once here: every rank keeps the whole base
    full = weight.full_tensor() if registry.is_dtensor(weight) else weight
    module = layer.module
    if layer.pending is not None:
        idx = layer.pending.to(full.device)
        module._buffers[layer.attr(INDICES)] = idx
        module._buffers[layer.attr(BASE)] = full.detach().reshape(-1)[idx.long()].clone()
        if layer.param == "weight" and not layer.conv:  # structured again from the indices in place
            set_structure(module, _structure(idx, tuple(full.shape)))
        layer.pending = None
        if values == "loaded":
            sync([layer])
        else:  # the weight holds the base: zero values, nothing to write
            layer.values.zero_()
    elif layer.quantized:
        if values is None:
            warnings.warn(ShiraWarning(
                f"layer {layer.name!r}: the state dict holds its quantized weight but not its "
                "values (a quantized weight cannot hold them): the adapter keeps the values it "
                "had; load the adapter file (AdapterBank.load, save_checkpoint) to restore it"),
                stacklevel=4)
    elif values is not None:
        sync([layer])
    else:
        fused = full.detach().reshape(-1)[layer.indices.long()]
        own = layer.values
        if full.dtype != own.dtype:
            warnings.warn(ShiraWarning(
                f"layer {layer.name!r}: the state dict holds its {full.dtype} fused weight but not "
                f"its {own.dtype} values: they are rebuilt from the fused weight, within its "
                "rounding (save the model's own state_dict, which holds them, to resume exactly)"),
                stacklevel=4)
        own.copy_(fused.to(own.dtype) - layer.base.to(own.dtype))
    registry.register(weight, layer)
    registry.register(layer.values, layer)


# -- training state on and off -------------------------------------------------------------------


def _structure(indices: Tensor, shape: tuple[int, ...]) -> list[Tensor]:
    """The mask's structure for the masked gradient (dense rows, columns and diagonals as
    GEMMs, the rest tile-ordered: `mask_structure`), built once from the indices; a mask
    without structure worth using gets `no_structure`'s empty tensors. Kept as a plain
    attribute (not buffers, which Dynamo compiles at fixed sizes)."""
    structure = mask_structure(indices, shape[0], shape[1]) or no_structure(indices)
    return on_device(structure, indices.device)


def _exposed(module: nn.Module) -> frozenset[str]:
    return frozenset(p for p, layer in layers_of(module).items() if not layer.quantized)


def _role(module: nn.Module) -> str | None:
    layer = layer_of(module)
    if layer is None:
        return None
    return "side" if layer.quantized else "conv" if layer.conv else "sparse"


@torch.no_grad()
def attach(t: TargetLayer, mask: Tensor, cfg: ShiraConfig) -> ShiraLayer:
    """Give one targeted module its adapter state and the SHiRA forward. A quantized module
    keeps its packed weight: the adapter rides beside it, and its base values (for the file's
    fingerprint) are read from the dequantized weight, one layer at a time."""
    module, w = t.module, t.weight
    idx = mask.to(dtype=torch.int32)
    if t.quantized:
        dense = t.dense_weight()
        layer = ShiraLayer(t.name, module, False, quantized=t.quantized, logical=tuple(t.shape))
        device = dense.device
        idx = idx.to(device)
        base = dense.reshape(-1)[idx.long()].clone()
        del dense
    else:
        layer = ShiraLayer(t.name, module, t.transposed, t.param, conv=t.conv)
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
    module.__dict__.setdefault(LAYERS, {})[t.param] = layer
    if t.param == "weight" and not t.conv:  # a quantized weight's by its logical shape
        module.__dict__[TRANSPOSED] = t.transposed
        set_structure(module, _structure(idx.to(device) if layer.pending is None else layer.pending,
                                         tuple(t.shape)))
    _set_class(module, _exposed(module), _role(module))
    registry.register(values, layer)
    if not w.is_meta:
        registry.register(w, layer)
    return layer


def detach(layer: ShiraLayer) -> None:
    """Take the adapter's state off the module (the layer keeps a copy in `removed`) and
    give the module back its own class (or the subclass its other adapted parameters need).
    The weight is not written here."""
    module = layer.module
    layer.removed = (layer.values.detach(), layer.indices, layer.base)
    module._parameters.pop(layer.attr(VALUES), None)
    module._buffers.pop(layer.attr(INDICES), None)
    module._buffers.pop(layer.attr(BASE), None)
    layers = layers_of(module)
    layers.pop(layer.param, None)
    if layer.param == "weight":
        for attr in (TRANSPOSED, STRUCTURE):
            module.__dict__.pop(attr, None)
    if not layers:
        module.__dict__.pop(LAYERS, None)
    _set_class(module, _exposed(module), _role(module))


# -- a bank's side paths --------------------------------------------------------------------------


def serve_beside(module: nn.Module, rows: object, transposed: bool = False) -> None:
    """Give a module the (empty) side paths a bank fills: the active adapter's for a
    quantized base, each row's correction in a mixed batch (`rows`: the bank's per-thread
    rows, the same object for every layer it serves)."""
    if is_served(module):
        if module.__dict__[ROWS] is not rows:
            raise ShiraAdapterError("AdapterBank: another bank already serves this model's layers; "
                                    "one model takes one bank")
        return
    if layers_of(module):
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
    _set_class(module, role="served")
