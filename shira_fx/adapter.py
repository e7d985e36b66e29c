"""`prepare` and `SparseAdapter`: per-layer indices, saved base values and trainable values.

Each prepared module holds its adapter's state: the trainable `shira_values` (a parameter, so
any optimizer built from `model.parameters()` trains it) and the `shira_indices` and
`shira_base` buffers (non-persistent: `model.state_dict()` keeps the base model's keys). The
fused weight is the single source of truth: after every optimizer step a global hook writes
`base + values` at the indices, so the forward is the plain dense linear, and the module's
forward routes training through the `sparse_linear` op, eagerly and compiled alike.
"""

from __future__ import annotations

import os
import sys
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import kernels, ops, quantized, registry
from .adapter_files import (
    LayerSpec,
    StoredAdapter,
    check_layer_tensors,
    fingerprint,
    write_peft,
    write_shira_fx,
)
from .config import ShiraConfig
from .errors import ShiraAdapterError, ShiraConfigError, ShiraTrainingError
from .masks import WEIGHT_FREE_MASKS, build_masks
from .targets import TargetLayer, find_targets

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


def layer_for_weight(weight: object) -> ShiraLayer | None:
    """The prepared layer whose module weight (or values) is this very tensor object."""
    return registry.layer_for(weight)


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


# adapters not yet removed: `remove` hands what it froze to another live adapter on the model
_LIVE: weakref.WeakSet = weakref.WeakSet()


class SparseAdapter(nn.Module):
    """The SHiRA adapter of one model: `parameters()` are exactly the per-layer values."""

    def __init__(self, cfg: ShiraConfig, layers: dict[str, ShiraLayer], frozen: list[nn.Parameter] = (),
                 holds: Iterable[nn.Parameter] = ()):
        super().__init__()
        self.cfg = cfg
        self.layers = layers
        self._frozen = list(frozen)  # what prepare froze, so remove can unfreeze exactly that
        self._holds = {id(p) for p in holds}  # every parameter this adapter needs frozen
        self._undo: list[Callable[[], None]] = []  # other changes prepare made to the model
        self._hooks: list = []
        self._removed = False
        _LIVE.add(self)

    def forward(self, *args, **kwargs):
        raise TypeError("SparseAdapter holds values; call the model it was prepared on")

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """Each layer's values, `<layer>.values` (they live on the layers' modules)."""
        for name, layer in self.layers.items():
            yield f"{prefix}{name}.values", layer.values

    def num_trainable(self) -> int:
        return sum(layer.values.numel() for layer in self.layers.values())

    @torch.no_grad()
    def sync(self) -> None:
        """Write `base + values` into every fused weight at its indices (O(nnz), assign)."""
        sync_layers(self.layers.values())

    @torch.no_grad()
    def materialize(self) -> None:
        """After loading the weights of a model prepared on meta by other means than
        `load_state_dict`: capture the base values and start from zero values."""
        for layer in self.layers.values():
            if layer.pending is not None:
                if layer.weight.is_meta:
                    raise ShiraConfigError(f"materialize: the weight of {layer.name!r} is still on "
                                           "the meta device; load the weights first")
                layer.weight_arrived()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Check that `optimizer` trains this adapter's values. Every optimizer step already
        syncs the fused weights of the values it holds (a global hook, whoever calls `step`:
        a hand-written loop, HF Trainer, Lightning, `train_step`), so nothing else is needed."""
        mine = {id(p) for p in self.parameters()}
        theirs = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not mine & theirs:
            raise ShiraConfigError(
                "SparseAdapter.attach: the optimizer holds none of this adapter's values; "
                "build it from adapter.parameters() or model.parameters()"
            )

    def register_values(self) -> None:
        """Kept for older code: the values are parameters of their modules (`<module>.shira_values`)
        from `prepare` on, so DDP and any optimizer over `model.parameters()` find them."""

    @torch.no_grad()
    def remove(self) -> None:
        """Undo `prepare`: restore the base weights bit-exactly, the modules' own forward and
        state, and the requires_grad flags that this prepare turned off."""
        if self._removed:
            return
        layers = list(self.layers.values())
        ready = [layer for layer in layers if layer.pending is None and not layer.quantized]
        targets = [layer.write_target() for layer in ready]
        ops.scatter_weights_([t[0] for t in targets], [t[1] for t in targets],
                             [t[2] for t in targets], None)
        registry.forget(layers)
        for layer in layers:
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
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        _LIVE.discard(self)
        for p in self._frozen:
            heir = next((a for a in _LIVE if id(p) in a._holds), None)
            if heir is not None:  # another adapter on this model still needs it frozen
                heir._frozen.append(p)
            else:
                p.requires_grad_(True)
        self._frozen.clear()
        for undo in self._undo:
            undo()
        self._undo.clear()
        self._removed = True

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:
        """`{"<layer>.indices": int32, "<layer>.values": values}` keyed by qualified names."""
        out: dict[str, Tensor] = {}
        for name, layer in self.layers.items():
            out[f"{name}.indices"] = layer.indices.detach()
            out[f"{name}.values"] = layer.values.detach()
        return out

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign=False):
        """Copy values saved by `state_dict` (same layers and indices) and sync the weights."""
        expected = set(self.state_dict())
        if set(state_dict) != expected:
            missing, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
            raise ShiraAdapterError(
                f"SparseAdapter.load_state_dict: missing keys {missing[:5]}, unexpected {extra[:5]}"
            )
        for name, layer in self.layers.items():
            idx, vals = state_dict[f"{name}.indices"], state_dict[f"{name}.values"]
            try:
                idx, vals = check_layer_tensors(idx, vals, layer.shape, layer.indices.numel())
            except ValueError as e:
                raise ShiraAdapterError(f"SparseAdapter.load_state_dict: layer {name!r}: {e}") from None
            if not torch.equal(idx.to(layer.indices.device), layer.indices.long()):
                raise ShiraAdapterError(f"SparseAdapter.load_state_dict: layer {name!r}: indices "
                                        "differ from this adapter's mask")
        for name, layer in self.layers.items():
            layer.values.copy_(state_dict[f"{name}.values"])
        self.sync()

    def _tensors(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {name: (layer.indices, layer.values) for name, layer in self.layers.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write indices and values as safetensors with JSON metadata, atomically."""
        specs = {name: layer.spec() for name, layer in self.layers.items()}
        write_shira_fx(path, self.cfg, specs, self._tensors())

    def to_peft(self, directory: str | os.PathLike) -> int:
        """Write a PEFT SHiRA directory (adapter_config.json + adapter_model.safetensors) that
        `PeftModel.from_pretrained` loads; returns the r it was written with."""
        specs = {name: layer.spec() for name, layer in self.layers.items()}
        return write_peft(directory, self.cfg, specs, self._tensors())

    def snapshot(self, source: str = "<SparseAdapter>") -> StoredAdapter:
        """The adapter as it is now (a copy of its values), detached from the model."""
        specs = {name: layer.spec() for name, layer in self.layers.items()}
        tensors = {name: (idx.detach().cpu().clone(), vals.detach().cpu().clone())
                   for name, (idx, vals) in self._tensors().items()}
        return StoredAdapter.in_memory(source, self.cfg, specs, tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def extra_repr(self) -> str:
        return f"layers={len(self.layers)}, trainable={self.num_trainable()}, mask={self.cfg.mask}"


@torch.no_grad()
def sync_layers(layers: Iterable[ShiraLayer]) -> None:
    """`W.flat[idx] = base + values` for these layers, in one fused scatter (a quantized layer
    has nothing to write: its adapter rides beside the packed weight)."""
    targets = [layer.write_target() for layer in layers if not layer.quantized]
    if targets:
        ops.scatter_weights_(*([t[i] for t in targets] for i in range(4)))


def _layers_of(optimizer: torch.optim.Optimizer) -> list[ShiraLayer]:
    """The prepared layers whose values `optimizer` holds."""
    layers = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            layer = registry.layer_for(p)
            if layer is not None and layer.removed is None and layer.values is p:
                layers.append(layer)
    return layers


_CHECKED: weakref.WeakSet = weakref.WeakSet()  # optimizers whose first step was checked


def _check_before_first_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global optimizer pre-step hook: before an optimizer's first step, refuse if backward
    reached some of its layers' values but not others (a weight used outside its module's
    forward, or not at all), naming them, rather than train them silently at zero."""
    if optimizer in _CHECKED:
        return
    _CHECKED.add(optimizer)
    layers = _layers_of(optimizer)
    missed = [layer.name for layer in layers if layer.values.grad is None]
    if missed and len(missed) < len(layers):
        raise ShiraTrainingError(
            f"optimizer.step(): backward reached no value of {len(missed)} prepared layer(s): "
            f"{', '.join(missed[:8])}{' ...' if len(missed) > 8 else ''}; their weights are not "
            "used through their module's forward (or not at all): leave them out with "
            "ShiraConfig(exclude_modules=[...])"
        )


def _sync_after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global optimizer post-step hook: sync the layers whose values this optimizer holds, so
    any training loop keeps the fused weights equal to `base + values`."""
    layers = _layers_of(optimizer)
    if layers:
        sync_layers(layers)


register_optimizer_step_pre_hook(_check_before_first_step)
register_optimizer_step_post_hook(_sync_after_step)


def _peft_layers(model: nn.Module) -> list[str]:
    """Names of PEFT tuner layers (LoRA and friends) in `model`, if PEFT is in use."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _check_targets(model: nn.Module, targets: list[TargetLayer], cfg: ShiraConfig) -> None:
    """Everything `prepare` refuses, before anything changes."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tuners = _peft_layers(model)
    for t in targets:
        w = t.weight
        if registry.layer_for(w) is not None or (t.param == "weight" and "_shira_layer" in t.module.__dict__):
            raise ShiraConfigError(
                f"prepare: {t.name!r} already carries a SHiRA adapter; call adapter.remove() first"
            )
        inside = next((n for n in tuners if t.name.startswith(n + ".")), None)
        if inside is not None:
            raise ShiraConfigError(
                f"prepare: {t.name!r} belongs to the PEFT layer {inside!r}: this model is wrapped by "
                "PEFT; prepare the base model before peft.get_peft_model, or merge the PEFT "
                "adapter first (merge_and_unload())"
            )
        attrs = [kind if t.param == "weight" else f"{t.param}_{kind}" for kind in (VALUES, INDICES, BASE)]
        if any(hasattr(t.module, attr) for attr in attrs):
            raise ShiraConfigError(f"prepare: {t.name!r} already has an attribute named like "
                                   f"shira_fx's own ({', '.join(attrs)})")
        unknown = None if t.quantized else quantized.unknown_quantized(t.module)
        if unknown is not None:
            raise ShiraConfigError(f"prepare: {t.name!r} is a quantized layer shira_fx does not know "
                                   f"({unknown}); supported: bitsandbytes 4/8-bit, torchao NF4, int8, int4")
        if t.quantized:
            continue
        if not w.is_floating_point():
            raise ShiraConfigError(f"prepare: the weight of {t.name!r} is {w.dtype}; expected a float dtype")
        if w.numel() == 0:
            raise ShiraConfigError(f"prepare: the weight of {t.name!r} has shape {tuple(w.shape)}: "
                                   "no element to adapt")
        if not w.is_contiguous():
            raise ShiraConfigError(f"prepare: the weight of {t.name!r} is not contiguous")
        shared = names.get(id(w), [])
        if len(shared) > 1:
            raise ShiraConfigError(
                f"prepare: the weight of {t.name!r} is shared ({', '.join(shared)}, tied weights): "
                "the fused write would change every use while the values learn from one; leave "
                f"it out (ShiraConfig(exclude_modules=[{t.name!r}])) or untie the weights"
            )
        if w.is_meta and cfg.mask not in WEIGHT_FREE_MASKS:
            raise ShiraConfigError(
                f"prepare: mask={cfg.mask!r} reads the weights, but {t.name!r} is on the meta "
                "device; load them first (model.to_empty(device=...), model.load_state_dict(...)) "
                f"and prepare then, or use a mask that needs no weights ({', '.join(WEIGHT_FREE_MASKS)})"
            )


def prepare(
    model: nn.Module,
    cfg: ShiraConfig | None = None,
    calib: Iterable | None = None,
    loss_fn: Callable | None = None,
    progress: bool = True,
) -> SparseAdapter:
    """Freeze `model`, choose each targeted weight's mask and attach zero-initialised values.

    Everything that can fail (target matching, mask building, layout checks) runs before the
    model is touched, so a failed `prepare` leaves the model as it was. A model on the meta
    device can be prepared with a mask that needs no weights; its layers take their base
    values when the weights arrive through `load_state_dict`.
    """
    cfg = cfg or ShiraConfig()
    if not isinstance(cfg, ShiraConfig):
        raise ShiraConfigError(f"prepare: expected a ShiraConfig, found {type(cfg).__name__}")
    targets = find_targets(model, cfg)
    _check_targets(model, targets, cfg)
    masks = build_masks(model, targets, cfg, calib=calib, loss_fn=loss_fn, progress=progress)

    def is_values(p: Tensor) -> bool:
        layer = registry.layer_for(p)
        return layer is not None and layer.values is p

    frozen = [p for p in model.parameters() if p.requires_grad and not is_values(p)]
    for p in frozen:
        p.requires_grad_(False)
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    input_grads = bool(checkpointing) and hasattr(model, "enable_input_require_grads")
    if input_grads:
        # reentrant checkpointing only back-propagates through segments whose inputs need
        # grad; with the base frozen, the embeddings' output must (as PEFT does)
        model.enable_input_require_grads()
    layers = {t.name: _attach(t, masks[t.name], cfg) for t in targets}
    holds = [p for p in model.parameters() if not p.requires_grad]
    adapter = SparseAdapter(cfg, layers, frozen, holds)
    for layer in layers.values():
        module = layer.module
        adapter._hooks += [
            module.register_state_dict_post_hook(_drop_values_key(layer)),
            module.register_load_state_dict_pre_hook(_loading(layer)),
            module.register_load_state_dict_post_hook(_loaded(layer)),
        ]
    if input_grads:
        adapter._undo.append(model.disable_input_require_grads)
    return adapter


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
def _attach(t: TargetLayer, mask: Tensor, cfg: ShiraConfig) -> ShiraLayer:
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
