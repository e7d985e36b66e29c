"""Putting one adapter on a module and taking it off: `attach` gives a targeted module its
training state and forward (`shira_fx.layer` declares both), `detach` gives the module back
its own; the state-dict hooks keep the fused weight the truth across `load_state_dict`, and
`sync_layers` writes `base + values` into the fused weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from . import ops, registry
from .config import ShiraConfig
from .kernels.structure import mask_structure, no_structure
from .layer import (
    BASE,
    FORWARD,
    INDICES,
    LAYER,
    STRUCTURE,
    TRANSPOSED,
    VALUES,
    ShiraLayer,
    expose,
    install_forward,
    on_device,
    set_structure,
    side_forward,
    sparse_forward,
    unexpose,
)
from .targets import TargetLayer


def _structure(indices: Tensor, shape: tuple[int, ...]) -> list[Tensor]:
    """The mask's structure for the masked gradient (dense rows, columns and diagonals as
    GEMMs, the rest tile-ordered: `mask_structure`), built once from the indices; a
    mask without structure worth using gets `no_structure`'s empty tensors. Kept as a
    plain attribute (not buffers, which Dynamo compiles at fixed sizes)."""
    structure = mask_structure(indices, shape[0], shape[1]) or no_structure(indices)
    return on_device(structure, indices.device)


@torch.no_grad()
def weight_arrived(layer: ShiraLayer) -> None:
    """The weight was (re)loaded. On a layer prepared on meta, capture the base values there
    and start from zero values; otherwise the fused weight stays the truth: the values become
    what it now holds over the base (`load_state_dict(model.state_dict())` round-trips)."""
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
        if layer.param == "weight":  # structured again from the indices now in place
            set_structure(module, _structure(idx, tuple(full.shape)))
        layer.values.zero_()
        layer.pending = None
    else:
        fused = full.detach().reshape(-1)[layer.indices.long()]
        layer.values.copy_(fused.to(layer.values.dtype) - layer.base.to(layer.values.dtype))
    registry.register(weight, layer)
    registry.register(layer.values, layer)


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
            weight_arrived(layer)

    return hook


@torch.no_grad()
def sync_layers(layers: Iterable[ShiraLayer]) -> None:
    """`W.flat[idx] = base + values` for these layers, in one fused scatter (a quantized layer
    has nothing to write: its adapter rides beside the packed weight)."""
    targets = [layer.write_target() for layer in layers if not layer.quantized]
    if targets:
        ops.scatter_weights_(*([t[i] for t in targets] for i in range(4)))


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
    module.__dict__[LAYER] = layer
    install_forward(module, side_forward)
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
        module.__dict__[LAYER] = layer
        module.__dict__[TRANSPOSED] = t.transposed
        set_structure(module, _structure(idx.to(device) if layer.pending is None else layer.pending,
                                         tuple(w.shape)))
        install_forward(module, sparse_forward)
    expose(module, layer)
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
        for attr in (FORWARD, LAYER, TRANSPOSED, STRUCTURE):
            module.__dict__.pop(attr, None)
    if not layer.quantized:
        unexpose(module, layer.param)
