"""`prepare` and `SparseAdapter`: per-layer indices, saved base values and trainable values.

The fused weight is the single source of truth: after every optimizer step `sync` writes
`base + values` at the indices, so the forward is the plain dense linear. `prepare` points
each targeted module's eager forward at the `sparse_linear` op, so an uncompiled model trains
through the same op; under torch.compile the backend's fx pass does that rewrite instead.
"""

from __future__ import annotations

import itertools
import os
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import ops, registry
from .adapter_files import (
    LayerSpec,
    StoredAdapter,
    check_layer_tensors,
    fingerprint,
    write_peft,
    write_shira_fx,
)
from .config import ShiraConfig
from .errors import ShiraAdapterError, ShiraConfigError
from .masks import build_masks
from .targets import find_targets

# (layer) -> (weight, indices, base, values) that this process writes into; see write_target
Writer = Callable[["ShiraLayer"], tuple[Tensor, Tensor, Tensor, Tensor]]

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
    # who writes `base + values` when the weight is not a plain tensor of this process
    # (shira_fx.distributed.fully_shard installs one for FSDP2's sharded weights)
    writer: Writer | None = field(default=None, repr=False)
    # unique per layer for the life of the process; compiled code guards on it (_sparse_forward)
    uid: int = field(default_factory=lambda: next(_LAYER_UIDS), init=False, repr=False)

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    def write_target(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(weight, indices, base, values) that this process writes `base + values` into: the
        whole layer, or for a sharded (DTensor) weight the local block with local indices, so
        the fused weight stays the single source of truth under FSDP2 too."""
        if self.writer is not None:
            return self.writer(self)
        if registry.is_dtensor(self.weight):
            raise ShiraConfigError(
                f"layer {self.name!r}: the weight was sharded without shira_fx; use "
                "shira_fx.distributed.fully_shard, which also averages the values' gradients"
            )
        return self.weight, self.indices, self.base, self.values

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def fingerprint(self) -> str:
        """Identifies the base model this layer's adapter belongs to (see `fingerprint`)."""
        return fingerprint(self.indices, self.base)

    def spec(self) -> LayerSpec:
        """What an adapter file says about this layer."""
        return LayerSpec(self.name, self.shape, str(self.weight.dtype).removeprefix("torch."),
                         self.transposed, int(self.indices.numel()), self.fingerprint())


def layer_for_weight(weight: object) -> ShiraLayer | None:
    """The prepared layer whose module weight is this very tensor object, else None."""
    return registry.layer_for(weight)


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
        registry.forget(layers)
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
        registry.register(w, layer)
        t.module._shira_layer = layer
        t.module.forward = types.MethodType(_sparse_forward, t.module)
    adapter = SparseAdapter(cfg, layers, frozen)
    if input_grads:
        adapter._undo.append(model.disable_input_require_grads)
    return adapter
