"""Which prepared layer a tensor belongs to, by identity: the backend's pass and the optimizer
hook look weights and values up here; and which parameters a shira_fx training graph took
as inputs (so the first optimizer step can tell a compiled model from an eager one). Entries
hold weak references (the module keeps its layer alive) and vanish with the tensor, so a
dropped prepared model is freed."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable
from typing import Any

# id(tensor) -> (weakref to the tensor, weakref to its layer)
_ENTRIES: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def register(tensor: Any, layer: Any) -> None:
    """Remember that `tensor` (a weight or a layer's values) belongs to `layer`."""
    _ENTRIES[id(tensor)] = (weakref.ref(tensor), weakref.ref(layer))
    weakref.finalize(tensor, _ENTRIES.pop, id(tensor), None)


def layer_for(tensor: object) -> Any | None:
    """The layer `tensor` (this very object) was registered for, else None."""
    entry = _ENTRIES.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        return None
    return entry[1]()


def forget(layers: Iterable[Any]) -> None:
    """Drop every entry of these layers (one layer may have registered several tensors)."""
    gone = {id(layer) for layer in layers}
    while True:  # a finalizer may drop an entry while the entries are copied
        try:
            entries = list(_ENTRIES.items())
            break
        except RuntimeError:
            continue
    for key, (_, layer_ref) in entries:
        if id(layer_ref()) in gone:
            _ENTRIES.pop(key, None)


# id(parameter) -> weakref to it, for the parameters of compiled training graphs
_COMPILED: dict[int, weakref.ref] = {}


def note_compiled(tensors: Iterable[Any]) -> None:
    """Remember that these tensors were inputs of a training graph the backend compiled."""
    for t in tensors:
        if id(t) not in _COMPILED:
            _COMPILED[id(t)] = weakref.ref(t)
            weakref.finalize(t, _COMPILED.pop, id(t), None)


def was_compiled(tensor: object) -> bool:
    """Whether `tensor` (this very object) was an input of a compiled training graph."""
    ref = _COMPILED.get(id(tensor))
    return ref is not None and ref() is tensor


def is_dtensor(t: object) -> bool:
    """Whether `t` is a DTensor; none can be before torch.distributed.tensor is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)
