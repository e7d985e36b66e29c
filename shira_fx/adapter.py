"""`prepare` and `SparseAdapter`: a model's adapted layers (`shira_fx.layer`) as one adapter.

`prepare` checks every target, builds the masks and only then touches the model: it freezes
it and attaches each layer. The fused weight is the single source of truth: after every
optimizer step a global hook writes `base + values` at the indices of the layers that
optimizer trains, whatever loop calls `step`, so the forward is the plain dense linear.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import ops, quantized, registry
from .adapter_files import StoredAdapter, check_layer_tensors, write_peft, write_shira_fx
from .attach import attach, detach, weight_arrived
from .config import ShiraConfig
from .errors import ShiraAdapterError, ShiraConfigError, ShiraTrainingError, ShiraWarning
from .layer import (
    BASE,
    INDICES,
    PREPARED,
    VALUES,
    ShiraLayer,
    has_training_state,
    layer_of,
    layers_of,
    state_name,
    sync,
)
from .masks import WEIGHT_FREE_MASKS, build_masks
from .targets import TargetLayer, find_targets

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
        self._model: Callable[[], nn.Module | None] = lambda: None  # the prepared model (a weak ref)
        _LIVE.add(self)

    def forward(self, *args, **kwargs):
        raise TypeError("SparseAdapter holds values; call the model it was prepared on")

    @classmethod
    def of(cls, model: nn.Module) -> SparseAdapter:
        """The adapter of a prepared model: the one `prepare` returned while it lives, or for
        a copy of the model (`copy.deepcopy`, `torch.load`) a new one over the copy's layers,
        which trains, saves and removes like the original's."""
        records = model.__dict__.get(PREPARED, [])
        found = {layer.name: layer for m in model.modules() for layer in layers_of(m).values()}
        if not found or not records:
            raise ShiraConfigError(f"SparseAdapter.of: {type(model).__name__} carries no SHiRA adapter "
                                   "(pass the model prepare was given)")
        if len(records) > 1:
            raise ShiraConfigError(f"SparseAdapter.of: {len(records)} adapters were prepared on this "
                                   "model; keep the ones prepare returned")
        record = records[0]
        layers = {name: found[name] for name in record["layers"] if name in found}
        if len(layers) != len(record["layers"]):
            raise ShiraConfigError("SparseAdapter.of: some layers this adapter was prepared on are gone "
                                   f"({sorted(set(record['layers']) - set(layers))[:3]})")
        mine = {id(la) for la in layers.values()}
        live = next((a for a in list(_LIVE) if {id(la) for la in a.layers.values()} == mine), None)
        if live is not None:
            return live
        params = dict(model.named_parameters())
        adapter = cls(record["cfg"], layers, [params[n] for n in record["frozen"] if n in params],
                      [p for p in model.parameters() if not p.requires_grad])
        adapter._model = weakref.ref(model)
        return adapter

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """Each layer's values, `<layer>.values` (they live on the layers' modules)."""
        for name, layer in self.layers.items():
            yield f"{prefix}{name}.values", layer.values

    def num_trainable(self) -> int:
        return sum(layer.values.numel() for layer in self.layers.values())

    @torch.no_grad()
    def sync(self) -> None:
        """Write `base + values` into every fused weight at its indices (O(nnz), assign), as
        an optimizer step does: where weight and values share a dtype the values then hold
        exactly what the weight holds over the base (`layer.sync`)."""
        sync(self.layers.values(), round_values=True)

    @torch.no_grad()
    def materialize(self) -> None:
        """After loading the weights of a model prepared on meta by other means than
        `load_state_dict`: capture the base values and start from zero values."""
        for layer in self.layers.values():
            if layer.pending is not None:
                if layer.weight.is_meta:
                    raise ShiraConfigError(f"materialize: the weight of {layer.name!r} is still on "
                                           "the meta device; load the weights first")
                weight_arrived(layer)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an optimizer that trains none of this adapter's values. Nothing else needs
        doing: every optimizer step syncs the fused weights of the values it holds (a global
        hook, whoever calls `step`: a hand-written loop, HF Trainer, Lightning, `train_step`)."""
        mine = {id(p) for p in self.parameters()}
        theirs = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not mine & theirs:
            raise ShiraConfigError(
                "SparseAdapter.check_optimizer: the optimizer holds none of this adapter's values; "
                "build it from adapter.parameters() or model.parameters()"
            )

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
            detach(layer)
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
        model = self._model()
        if model is not None:
            names = set(self.layers)
            records = [r for r in model.__dict__.get(PREPARED, []) if set(r["layers"]) != names]
            if records:
                model.__dict__[PREPARED] = records
            else:
                model.__dict__.pop(PREPARED, None)
        self._removed = True

    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:
        """`{"<layer>.indices": int32, "<layer>.values": values}` keyed by qualified names."""
        out: dict[str, Tensor] = {}
        for name, layer in self.layers.items():
            out[f"{name}.indices"] = layer.indices.detach()
            out[f"{name}.values"] = layer.values.detach()
        return out

    def check_state(self, state_dict: dict[str, Tensor], where: str) -> dict[str, Tensor]:
        """`state_dict` if it is a state of this very adapter (as `state_dict` writes it: the
        same layers, valid values and this adapter's indices), else ShiraAdapterError naming
        `where` and the layer; checked before anything is changed."""
        expected = set(self.state_dict())
        if set(state_dict) != expected:
            layers = {k.rpartition(".")[0] for k in state_dict}
            what, missing, extra = "layers", set(self.layers) - layers, layers - set(self.layers)
            if not missing and not extra:  # the same layers, other keys
                what, missing, extra = "keys", expected - set(state_dict), set(state_dict) - expected
            raise ShiraAdapterError(f"{where}: a state of another adapter: {what} missing "
                                    f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
        for name, layer in self.layers.items():
            idx, vals = state_dict[f"{name}.indices"], state_dict[f"{name}.values"]
            try:
                idx, vals = check_layer_tensors(idx, vals, layer.shape, layer.indices.numel())
            except ValueError as e:
                raise ShiraAdapterError(f"{where}: layer {name!r}: {e}") from None
            if not torch.equal(idx.cpu(), layer.indices.long().cpu()):
                raise ShiraAdapterError(f"{where}: layer {name!r}: indices differ from this adapter's "
                                        "mask (a state of another adapter or mask seed)")
        return state_dict

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign=False):
        """Copy values saved by `state_dict` (same layers and indices) and sync the weights."""
        self.check_state(state_dict, "SparseAdapter.load_state_dict")
        for name, layer in self.layers.items():
            layer.values.copy_(state_dict[f"{name}.values"])
        sync(self.layers.values())  # the values as given, bit for bit

    def _tensors(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {name: (layer.indices, layer.values) for name, layer in self.layers.items()}

    def save(self, path: str | os.PathLike, values_dtype: torch.dtype | None = None) -> None:
        """Write the adapter as one safetensors file with JSON metadata, atomically: each layer's
        indices in the smallest exact code (a rand mask as its recipe, a struct mask as its
        structure, others gap-coded), its values as trained. `values_dtype=torch.bfloat16`
        halves the values' bytes by rounding them: lossy, and only when asked."""
        specs = {name: layer.spec() for name, layer in self.layers.items()}
        write_shira_fx(path, self.cfg, specs, self._tensors(), values_dtype)

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


def check_backward_reached(reached: dict[str, bool], where: str) -> None:
    """Refuse a step in which backward reached some prepared layers' values but not others (a
    weight used outside its module's forward, or not at all), naming them, rather than train
    them silently at zero; `reached` maps each layer to whether its values got a gradient."""
    missed = [name for name, got in reached.items() if not got]
    if missed and len(missed) < len(reached):
        raise ShiraTrainingError(
            f"{where}: backward reached no value of {len(missed)} prepared layer(s): "
            f"{', '.join(missed[:8])}{' ...' if len(missed) > 8 else ''}; their weights are not "
            "used through their module's forward (or not at all): leave them out with "
            "ShiraConfig(exclude_modules=[...])"
        )


def _check_before_first_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global optimizer pre-step hook: before an optimizer's first step, `check_backward_reached`
    over the layers whose values it holds."""
    if optimizer in _CHECKED:
        return
    _CHECKED.add(optimizer)
    layers = _layers_of(optimizer)
    check_backward_reached({la.name: la.values.grad is not None for la in layers}, "optimizer.step()")
    _warn_if_compiled_without_layers(layers)


def _warn_if_compiled_without_layers(layers: list[ShiraLayer]) -> None:
    """A model compiled with the shira_fx backend whose training graphs hold none of its
    prepared layers (Dynamo broke the graph around them, so they all ran eagerly: right, but
    uncompiled) is reported once, with the graph breaks Dynamo counted."""
    if not layers or any(layer.compiled for layer in layers):
        return
    ids = {id(layer) for layer in layers}
    models = [a._model() for a in list(_LIVE) if any(id(la) in ids for la in a.layers.values())]
    if not any(m is not None and any(registry.was_compiled(p) for p in m.parameters()) for m in models):
        return
    breaks = torch._dynamo.utils.counters["graph_break"].most_common(3)
    reasons = "; ".join(f"{reason.strip().splitlines()[0][:160]} (x{n})" for reason, n in breaks)
    warnings.warn(ShiraWarning(
        f"torch.compile with the shira_fx backend compiled training graphs of this model, but none "
        f"holds any of its {len(layers)} prepared layers: they ran eagerly (they train right, "
        f"uncompiled). Dynamo broke the graph: {reasons or 'no break counted'}. "
        "torch._logging.set_logs(graph_breaks=True) shows where"), stacklevel=3)


def _sync_after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global optimizer post-step hook: sync the layers whose values this optimizer holds, so
    any training loop keeps the fused weights equal to `base + values`."""
    layers = _layers_of(optimizer)
    if layers:
        sync(layers, round_values=True)


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
        if registry.layer_for(w) is not None or (t.param == "weight" and layer_of(t.module) is not None):
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
        attrs = [state_name(t.param, kind) for kind in (VALUES, INDICES, BASE)]
        if has_training_state(t.module, t.param):
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
    values when the weights arrive through `load_state_dict`. Every bitsandbytes 4-bit layer
    of the model is settled in its standard layout first (`quantized.settle_layout`), so the
    masks, training and compiled graphs all read one layout.
    """
    cfg = cfg or ShiraConfig()
    if not isinstance(cfg, ShiraConfig):
        raise ShiraConfigError(f"prepare: expected a ShiraConfig, found {type(cfg).__name__}")
    targets = find_targets(model, cfg)
    _check_targets(model, targets, cfg)
    settled = settle_layouts(model)
    try:
        masks = build_masks(model, targets, cfg, calib=calib, loss_fn=loss_fn, progress=progress)
    except BaseException:
        for undo in settled:
            undo()
        raise

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
    layers = {t.name: attach(t, masks[t.name], cfg) for t in targets}
    holds = [p for p in model.parameters() if not p.requires_grad]
    adapter = SparseAdapter(cfg, layers, frozen, holds)
    adapter._model = weakref.ref(model)
    names = {id(p): n for n, p in model.named_parameters()}
    model.__dict__.setdefault(PREPARED, []).append(
        {"cfg": cfg, "layers": list(layers), "frozen": [names[id(p)] for p in frozen if id(p) in names]})
    if input_grads:
        adapter._undo.append(model.disable_input_require_grads)
    adapter._undo += settled
    return adapter


def settle_layouts(model: nn.Module) -> list[Callable[[], None]]:
    """`quantized.settle_layout` for every module of `model`; the undos of those it pinned."""
    try:
        undos = [quantized.settle_layout(m) for m in model.modules()]
    except ValueError as e:
        raise ShiraConfigError(f"prepare: {e}") from None
    return [u for u in undos if u is not None]
