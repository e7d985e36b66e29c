"""`prepare` and `SparseAdapter`: per-layer indices, saved base values and trainable values.

The fused weight is the single source of truth (DESIGN.md invariant 2): after every optimizer
step `sync` writes `base + values` at the indices, so the forward is the plain dense linear.
`prepare` also points each targeted module's eager forward at the `sparse_linear` op, so an
uncompiled model trains through the same op; under torch.compile that forward falls back to
the module's own code and the backend's fx pass does the rewrite instead.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import ops
from .adapter_files import FORMAT_NAME, FORMAT_VERSION, atomic_save_file, fingerprint, write_peft
from .config import ShiraConfig
from .errors import ShiraAdapterError, ShiraConfigError, ShiraTrainingError
from .masks import build_masks
from .targets import find_targets

_LAYER_UIDS = itertools.count()


@dataclass(eq=False)
class ShiraLayer:
    """One adapted weight: flat sorted int32 `indices` into the weight as stored, the base
    values found there before training (`base`, the weight's dtype) and the trainable
    `values` (the delta, fp32 by default)."""

    name: str
    module: nn.Module
    indices: Tensor
    base: Tensor
    values: nn.Parameter
    transposed: bool
    # set by shira_fx.distributed.fully_shard: FSDP2 owns the weight, and between steps the
    # module holds only this rank's shard (a DTensor); `_shard_plan` caches which of the
    # layer's indices that shard holds
    sharded: bool = field(default=False, repr=False)
    _shard_plan: tuple | None = field(default=None, init=False, repr=False)
    # unique per layer for the life of the process; compiled code guards on it (_sparse_forward)
    uid: int = field(default_factory=lambda: next(_LAYER_UIDS), init=False, repr=False)

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    def write_target(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(weight, indices, base, values) that this process writes `base + values` into: the
        whole layer, or for a sharded (DTensor) weight the local block with local indices, so
        the fused weight stays the single source of truth under FSDP2 too."""
        w = self.weight
        if _is_dtensor(w):
            if not self.sharded:
                raise ShiraConfigError(
                    f"layer {self.name!r}: the weight was sharded without shira_fx; use "
                    "shira_fx.distributed.fully_shard, which also averages the values' gradients"
                )
            from .distributed import local_write_target

            return local_write_target(self, w)
        if self.sharded:
            raise ShiraTrainingError(
                f"layer {self.name!r}: FSDP2 holds the weight unsharded, so a write would be lost "
                "at the next all-gather; sync after backward (when FSDP2 has resharded)"
            )
        return w, self.indices, self.base, self.values

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def fingerprint(self) -> str:
        """Identifies the base model this layer's adapter belongs to (see `fingerprint`)."""
        return fingerprint(self.indices, self.base)


# id(weight) -> (weakref to the weight, weakref to its layer): how the backend recognises
# prepared weights in a Dynamo graph. Both references are weak (the module keeps its layer
# alive) and a finalizer drops the entry with the weight, so a prepared model that is simply
# dropped is freed.
_REGISTRY: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _register(weight: Tensor, layer: ShiraLayer) -> None:
    _REGISTRY[id(weight)] = (weakref.ref(weight), weakref.ref(layer))
    weakref.finalize(weight, _REGISTRY.pop, id(weight), None)


def _forget(layers: Iterable[ShiraLayer]) -> None:
    """Drop every registry entry of these layers: under FSDP2 one layer has registered both
    its original weight and the unsharded parameter FSDP2 gathers into."""
    gone = {id(layer) for layer in layers}
    while True:  # a finalizer may drop an entry while we copy the registry
        try:
            entries = list(_REGISTRY.items())
            break
        except RuntimeError:
            continue
    for key, (_, layer_ref) in entries:
        if id(layer_ref()) in gone:
            _REGISTRY.pop(key, None)


def _is_dtensor(t: object) -> bool:
    """No tensor can be a DTensor before torch.distributed.tensor is imported (saves the import)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def layer_for_weight(weight: object) -> ShiraLayer | None:
    """The prepared layer whose module weight is this very tensor object, else None."""
    entry = _REGISTRY.get(id(weight))
    if entry is None or entry[0]() is not weight:
        return None
    return entry[1]()


def _sparse_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Eager forward of a prepared module: the same `sparse_linear` op the backend inserts.

    Under compilation it runs the module's own (dense) forward for the pass to rewrite, and
    reads `layer.uid` so that Dynamo guards the compiled code on it. The pass bakes this
    layer's values and indices into the graph, while Dynamo guards a parameter only on its
    shape: without the uid guard, the code compiled for one block would be reused for another
    block of the same shape (blocks compiled one by one, a graph break between blocks, a
    second model) and train the first block's values with the other block's gradient.
    """
    layer: ShiraLayer = self._shira_layer
    if torch.compiler.is_compiling():
        if layer.uid < 0:  # never true; the comparison makes Dynamo guard `uid == <this layer's>`
            raise AssertionError(layer.uid)
        return type(self).forward(self, x)
    if not (torch.is_grad_enabled() and layer.values.requires_grad):
        return type(self).forward(self, x)
    return ops.sparse_linear(
        x, self.weight, self.bias, layer.values, layer.indices, layer.transposed
    )


VALUES_PARAMETER = "shira_values"  # the values' name on their module after `register_values`


def _drop_values_key(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    state_dict.pop(prefix + VALUES_PARAMETER, None)


def _values_not_missing(module: nn.Module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if k.rpartition(".")[2] != VALUES_PARAMETER]


class SparseAdapter(nn.Module):
    """The SHiRA adapter of one model: `parameters()` are exactly the per-layer values."""

    def __init__(
        self, cfg: ShiraConfig, layers: dict[str, ShiraLayer], frozen: list[nn.Parameter] = ()
    ):
        super().__init__()
        self.cfg = cfg
        self._frozen = list(frozen)  # what prepare froze, so remove can unfreeze exactly that
        self._undo: list[Callable[[], None]] = []  # other changes prepare made to the model
        self.layers = layers
        self._values = nn.ParameterList([layer.values for layer in layers.values()])
        self._attached: weakref.WeakSet = weakref.WeakSet()
        self._hooks: list = []

    def forward(self, *args, **kwargs):
        raise TypeError("SparseAdapter holds values; call the model it was prepared on")

    def num_trainable(self) -> int:
        return sum(layer.values.numel() for layer in self.layers.values())

    @torch.no_grad()
    def sync(self) -> None:
        """Write `base + values` into every fused weight at its indices (O(nnz), assign)."""
        ops.scatter_weights_(*self._write_lists())

    def _write_lists(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Per-layer weights, indices, base and values for one scatter (see `write_target`)."""
        targets = [layer.write_target() for layer in self.layers.values()]
        weights, indices, base, values = ([t[i] for t in targets] for i in range(4))
        return weights, indices, base, values

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the fused weights equal to `base + values` after every `optimizer.step()`,
        whoever calls it (a hand-written loop, HF Trainer, Lightning, `train_step`)."""
        if optimizer in self._attached:
            return
        mine = {id(p) for p in self.parameters()}
        theirs = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not mine & theirs:
            raise ShiraConfigError(
                "SparseAdapter.attach: the optimizer holds none of this adapter's values; "
                "build it from adapter.parameters()"
            )
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.sync()))
        self._attached.add(optimizer)

    def register_values(self) -> None:
        """Make each layer's values a parameter of its module, `<module>.shira_values`, so that
        wrappers which collect `model.parameters()` find them: `DistributedDataParallel(model)`
        then all-reduces their gradients, and a Trainer's optimizer trains them.

        Opt-in, because code that reads `model.parameters()` as the frozen base would now see
        the values too. The model's state_dict leaves them out, so it keeps the base model's
        keys and holds the fused weights (the adapter's own `save` holds the values), and a
        state_dict without them still loads strictly. `remove` undoes this.
        """
        for layer in self.layers.values():
            module = layer.module
            if module._parameters.get(VALUES_PARAMETER) is layer.values:
                continue
            if hasattr(module, VALUES_PARAMETER):
                raise ShiraConfigError(
                    f"register_values: {layer.name!r} already has an attribute {VALUES_PARAMETER!r}"
                )
            module.register_parameter(VALUES_PARAMETER, layer.values)
            self._hooks.append(module.register_state_dict_post_hook(_drop_values_key))
            self._hooks.append(module.register_load_state_dict_post_hook(_values_not_missing))
            self._undo.append(lambda m=module: m._parameters.pop(VALUES_PARAMETER, None))

    @torch.no_grad()
    def remove(self) -> None:
        """Undo `prepare`: restore the base weights bit-exactly, the modules' own forward and
        the requires_grad flags that prepare turned off."""
        layers = list(self.layers.values())
        weights, indices, base, _ = self._write_lists()
        ops.scatter_weights_(weights, indices, base, None)
        _forget(layers)
        for layer in layers:
            layer.module.__dict__.pop("forward", None)
            layer.module.__dict__.pop("_shira_layer", None)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen.clear()
        for undo in self._undo:
            undo()
        self._undo.clear()

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
            if idx.shape != layer.indices.shape or not torch.equal(
                idx.to(layer.indices), layer.indices
            ):
                raise ShiraAdapterError(f"layer {name!r}: indices differ from this adapter's mask")
            if vals.shape != layer.values.shape:
                raise ShiraAdapterError(
                    f"layer {name!r}: values shape {tuple(vals.shape)}, "
                    f"expected {tuple(layer.values.shape)}"
                )
            if not torch.isfinite(vals).all():
                raise ShiraAdapterError(f"layer {name!r}: values contain NaN or Inf")
        for name, layer in self.layers.items():
            layer.values.copy_(state_dict[f"{name}.values"])
        self.sync()

    def metadata(self) -> dict[str, str]:
        """safetensors header metadata: format, config, per-layer shape/dtype and fingerprint."""
        layers = {
            name: {
                "shape": list(layer.shape),
                "dtype": str(layer.weight.dtype).removeprefix("torch."),
                "transposed": layer.transposed,
                "nnz": int(layer.indices.numel()),
                "fingerprint": layer.fingerprint(),
            }
            for name, layer in self.layers.items()
        }
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "config": self.cfg.to_json(),
            "layers": json.dumps(layers, sort_keys=True),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write indices and values as safetensors with JSON metadata, atomically (temp file
        in the same folder + rename), so a crash never leaves a half-written adapter."""
        atomic_save_file(self.state_dict(), path, metadata=self.metadata())

    def to_peft(self, directory: str | os.PathLike) -> None:
        """Write a PEFT SHiRA directory (adapter_config.json + adapter_model.safetensors)."""
        write_peft(self, directory)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def extra_repr(self) -> str:
        return f"layers={len(self.layers)}, trainable={self.num_trainable()}, mask={self.cfg.mask}"


def prepare(
    model: nn.Module,
    cfg: ShiraConfig | None = None,
    calib: Iterable | None = None,
    loss_fn: Callable | None = None,
    progress: bool = True,
) -> SparseAdapter:
    """Freeze `model`, choose each targeted weight's mask and attach zero-initialised values.

    Everything that can fail (target matching, mask building, layout checks) runs before the
    model is touched, so a failed `prepare` leaves the model as it was.
    """
    cfg = cfg or ShiraConfig()
    if not isinstance(cfg, ShiraConfig):
        raise ShiraConfigError(f"prepare: expected a ShiraConfig, found {type(cfg).__name__}")
    targets = find_targets(model, cfg)
    for t in targets:
        if layer_for_weight(t.weight) is not None or "_shira_layer" in t.module.__dict__:
            raise ShiraConfigError(
                f"prepare: {t.name!r} already carries a SHiRA adapter; call adapter.remove() first"
            )
        if not t.weight.is_contiguous():
            raise ShiraConfigError(f"prepare: the weight of {t.name!r} is not contiguous")
        if not t.weight.is_floating_point():
            raise ShiraConfigError(
                f"prepare: the weight of {t.name!r} is {t.weight.dtype}; expected a float dtype"
            )
    masks = build_masks(model, targets, cfg, calib=calib, loss_fn=loss_fn, progress=progress)

    frozen = [p for p in model.parameters() if p.requires_grad]
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
    layers: dict[str, ShiraLayer] = {}
    for t in targets:
        w = t.weight
        idx = masks[t.name].to(device=w.device, dtype=torch.int32)
        with torch.no_grad():
            base = w.detach().view(-1)[idx.long()].clone()
        values = nn.Parameter(torch.zeros(idx.numel(), dtype=cfg.torch_values_dtype, device=w.device))
        layer = ShiraLayer(t.name, t.module, idx, base, values, t.transposed)
        layers[t.name] = layer
        _register(w, layer)
        t.module._shira_layer = layer
        t.module.forward = types.MethodType(_sparse_forward, t.module)
    adapter = SparseAdapter(cfg, layers, frozen)
    if input_grads:
        adapter._undo.append(model.disable_input_require_grads)
    return adapter
