"""AdapterBank: many SHiRA adapters beside one base model, switched and fused in place.

Switching is O(nnz): `activate` restores the positions the previous activation touched from
saved base values, then writes `base + Σ wᵢ·deltaᵢ` at the new positions: two fused scatter
launches over all layers, no weight-sized tensor, no recompilation (weights change in place;
compiled inference graphs read them as inputs). Because restoring writes saved base values,
the base is bit-exact after any sequence. Threads meet at the bank's gate (`gate`); mixed
batches are in `mixed`.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import ops
from ..adapter import SparseAdapter, settle_layouts
from ..adapter_files import StoredAdapter, fingerprint, load_adapter
from ..attach import serve_beside
from ..errors import ShiraAdapterError, ShiraConfigError
from ..layer import set_side
from ..quantized import was_repacked
from ..targets import resolve_layer
from . import mixed
from .gate import MIXED, Gate
from .slots import Slot, fuse


@dataclass
class _Plan:
    """What one activation writes: per layer, the union of positions, the base values there
    (for the later restore) and the fused values to write."""

    weights: list[Tensor]
    indices: list[Tensor]
    base: list[Tensor]
    fused: list[Tensor]
    # quantized layers: (module, indices, fp32 delta) set as the module's side path
    side: list[tuple[nn.Module, Tensor, Tensor]] = field(default_factory=list)


class AdapterBank:
    """Adapters held beside `model`, activated (alone or fused) directly in its weights.

    `keep_on_device=False` keeps each adapter's tensors in host memory (pinned on CUDA) and
    copies them to the device only when an activation plan is built. `max_plans`: activation
    plans kept; `max_mixed`: fusions (and adapters at a weight other than 1) that mixed
    batches keep packed beside the loaded adapters, the oldest dropped first.

    Threads: `with bank.using("a") as model: out = model(x)` guarantees that the model
    computes with exactly adapter "a" (or a `{name: weight}` fusion, or None for the base)
    until the block ends, whatever other threads do. Requests for the adapter already active
    run together and do not switch (no weight is written); a request for another one waits
    until the current requests have left, switches, and runs. Once a switch waits, new
    requests for the active adapter queue behind it, so a busy adapter cannot starve a switch
    (the policy is spelled out on `_Gate`). Mixed batches (`per_request`) are readers too, of
    whatever is active. `activate`, `deactivate`, `load` and `unload` take
    the same gate exclusively, so a bare call from another thread never changes the weights
    under a running request; calling them inside a `using` block of the same thread raises
    instead of deadlocking, and a `using` of the same spec may nest. Reads of the weights
    outside any `using` block (a bare `model(x)`) are not protected.

    The bank settles the model's bitsandbytes 4-bit layers in their standard layout
    (`quantized.settle_layout`): they no longer repack for AVX512-BF16 CPUs while it serves.
    """

    def __init__(self, model: nn.Module, keep_on_device: bool = True, max_plans: int = 8,
                 max_mixed: int = 64):
        for what, n in (("max_plans", max_plans), ("max_mixed", max_mixed)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ShiraConfigError(f"AdapterBank: {what} must be a positive int, found {n!r}")
        self.model = model
        settle_layouts(model)  # quantized layers compute with one layout from now on
        self.keep_on_device = keep_on_device
        self.max_plans = max_plans
        self.max_mixed = max_mixed
        self._adapters: dict[str, dict[str, Slot]] = {}
        self._active: dict[str, float] | None = None
        self._current: _Plan | None = None
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()
        self._served: list[dict[str, float]] = []  # fusions and weights per_request has served
        self._table: mixed.Table | None = None  # what the layers' request buffers hold (None: stale)
        self._rows = mixed.RowsPerThread()
        self._gate = Gate()

    @contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        if self._gate.held() is not None:
            raise ShiraAdapterError(f"{what} inside `with bank.using(...)` (or per_request) of the same "
                                    "thread would deadlock; leave the block first")
        self._gate.acquire_write()
        try:
            yield
        finally:
            self._gate.release_write()

    @contextmanager
    def using(self, spec: str | Mapping[str, float] | None) -> Iterator[nn.Module]:
        """Compute with `spec` active for the duration of the block (see the class docstring);
        yields the model."""
        want = None if spec is None else (self._normalise(spec) or None)
        gate = self._gate
        held = gate.held()
        if held is not None:  # nested in the same thread: only the same adapter can be held
            if held[0] is MIXED:
                raise ShiraAdapterError(f"using({spec!r}) inside per_request(...) of the same thread; "
                                        "leave that block first")
            if held[0] != want:
                raise ShiraAdapterError(f"using({spec!r}) inside using({held[0]!r}) of the same thread")
            gate.local.held = (held[0], held[1] + 1)
            try:
                yield self.model
            finally:
                gate.local.held = held
            return
        switch = gate.enter(lambda: self._active == want)
        if switch:
            try:
                # validated again under the gate: another thread may have unloaded an adapter
                self._activate(self._normalise(spec) if want else {})
            except BaseException:
                gate.release_write()
                raise
            gate.release_write(then_read=True)
        gate.local.held = (want, 1)
        try:
            yield self.model
        finally:
            gate.local.held = None
            gate.release_read()

    # -- loading ---------------------------------------------------------------------------
    def load(self, name: str, source: str | os.PathLike | SparseAdapter | StoredAdapter,
             check_base: bool = True) -> None:
        """Validate an adapter against this model and keep it; the weights are not touched.

        `source`: a shira_fx file, a PEFT SHiRA directory, a SparseAdapter (its current
        values are snapshotted) or a StoredAdapter. `check_base=False` skips the base
        fingerprint (e.g. serving an fp32-trained adapter on a bf16 copy of the model).
        """
        with self._exclusive("load"):
            self._load(name, source, check_base)

    def _load(self, name: str, source, check_base: bool) -> None:
        if not isinstance(name, str) or not name:
            raise ShiraAdapterError(f"AdapterBank.load: name must be a non-empty str, found {name!r}")
        if name in self._adapters:
            raise ShiraAdapterError(f"AdapterBank.load: {name!r} is already loaded; unload it first")
        if isinstance(source, SparseAdapter):
            stored = source.snapshot(f"<SparseAdapter {name}>")
        elif isinstance(source, StoredAdapter):
            stored = source
        else:
            stored = load_adapter(source)
        slots = {}
        beside = []
        modules = dict(self.model.named_modules())
        for layer_name, spec in stored.layers.items():
            found = resolve_layer(self.model, layer_name, modules)
            if found is None:
                raise stored.error("no linear layer (or 3-D parameter) of this name in the model "
                                   "(an adapter for another model?)", layer_name)
            w, transposed, shape = found.weight, found.transposed, tuple(found.shape)
            if spec.shape is not None and shape != spec.shape:
                raise stored.error(f"weight shape {spec.shape} in the adapter, "
                                   f"{shape} in the model", layer_name)
            if spec.shape is not None and spec.transposed != transposed:
                raise stored.error("weight layout (Linear vs Conv1D) differs from the model's",
                                   layer_name)
            idx, delta = stored.tensors(layer_name, shape)
            if found.quantized:  # the packed weight is never written: the base is read dequantized
                dense = found.dense_weight()
                idx = idx.to(dense.device)
                base, w = dense.reshape(-1)[idx].clone(), dense
                beside.append(found.module)
            else:
                idx = idx.to(w.device)
                base = self._true_base(layer_name, w, idx)
            if check_base and spec.fingerprint is not None:
                wdtype = str(base.dtype).removeprefix("torch.")
                if spec.dtype != wdtype:
                    raise stored.error(f"trained on {spec.dtype} weights, the model has {wdtype} "
                                       "(pass check_base=False to serve it anyway)", layer_name)
                if not fingerprint(idx, base).startswith(spec.fingerprint):  # v2 files keep 32 digits
                    repacked = found.quantized and was_repacked(found.module)
                    raise stored.error(
                        "base fingerprint differs: the adapter was trained on another base model "
                        + ("(this layer was repacked by bitsandbytes for AVX512-BF16 CPUs, which rounds "
                           "its scales to bf16, the first time it ran in inference mode: build the "
                           "bank before the model's first inference, or pass check_base=False)"
                           if repacked else "(or this model's weights there are not its base: an "
                           "adapter still fused by training? call adapter.remove() first)"), layer_name)
            slots[layer_name] = self._keep(Slot(idx, base, delta.to(w.device)))
        for module in beside:
            serve_beside(module, self._rows)
        self._adapters[name] = slots
        self._table = None

    def _keep(self, slot: Slot) -> Slot:
        if self.keep_on_device or slot.indices.device.type == "cpu":
            return slot
        pin = torch.cuda.is_available()
        host = [t.cpu().pin_memory() if pin else t.cpu() for t in (slot.indices, slot.base, slot.delta)]
        return Slot(*host)

    @torch.no_grad()
    def _true_base(self, layer_name: str, w: Tensor, idx: Tensor) -> Tensor:
        """Base values at idx: read from the weight, except where the current activation
        wrote, where the saved base is taken instead."""
        base = w.view(-1).index_select(0, idx)  # a copy (and faster than indexing)
        cur = self._current
        if cur is not None:
            for cw, cidx, cbase in zip(cur.weights, cur.indices, cur.base, strict=True):
                if cw is w and cidx.numel():
                    pos = torch.searchsorted(cidx, idx).clamp_max(cidx.numel() - 1)
                    hit = cidx[pos] == idx
                    base[hit] = cbase[pos[hit]]
        return base

    # -- switching -------------------------------------------------------------------------
    @property
    def active(self) -> dict[str, float] | None:
        """The active adapters and their weights, or None when the model is at its base."""
        return None if self._active is None else dict(self._active)

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def _normalise(self, spec: str | Mapping[str, float]) -> dict[str, float]:
        if isinstance(spec, str):
            spec = {spec: 1.0}
        if not isinstance(spec, Mapping):
            raise ShiraAdapterError(f"activate: expected a name or {{name: weight}}, found {spec!r}")
        out = {}
        for name, weight in spec.items():
            if name not in self._adapters:
                raise ShiraAdapterError(f"activate: adapter {name!r} is not loaded "
                                        f"(loaded: {self.names})")
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
                raise ShiraAdapterError(f"activate: weight of {name!r} must be a finite number, "
                                        f"found {weight!r}")
            out[name] = float(weight)
        return out

    def _plan(self, spec: dict[str, float]) -> _Plan:
        key = tuple(sorted(spec.items()))
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        names = sorted(spec)
        layer_names = sorted({ln for n in names for ln in self._adapters[n]})
        plan = _Plan([], [], [], [])
        modules = dict(self.model.named_modules())
        for ln in layer_names:
            found = resolve_layer(self.model, ln, modules)
            w = found.weight
            parts = [(self._adapters[n][ln], spec[n]) for n in names if ln in self._adapters[n]]
            if found.quantized:  # nothing is written into it: only a device and dtype are read
                w = parts[0][0].delta
            if len(parts) == 1:
                slot, weight = parts[0]
                idx, base = slot.indices.to(w.device), slot.base.to(w.device)
                delta = slot.delta.to(w.device) * weight
            else:
                idx, delta, inverse = fuse([(s.indices, s.delta, wt) for s, wt in parts], w.device)
                base = torch.empty(idx.numel(), dtype=w.dtype, device=w.device)
                base.scatter_(0, inverse, torch.cat([s.base.to(w.device) for s, _ in parts]))
            if found.quantized:
                plan.side.append((found.module, idx.to(torch.int32), delta.float()))
                continue
            plan.weights.append(w)
            plan.indices.append(idx)
            plan.base.append(base)
            plan.fused.append((base.float() + delta).to(w.dtype))
        self._plans[key] = plan
        while len(self._plans) > self.max_plans:
            self._plans.popitem(last=False)
        return plan

    @torch.no_grad()
    def activate(self, spec: str | Mapping[str, float]) -> None:
        """Make the model compute with one adapter (`"name"`) or a weighted fusion
        (`{"a": 1.0, "b": 0.7}`: base + Σ wᵢ·deltaᵢ over the union of positions)."""
        with self._exclusive("activate"):
            self._activate(self._normalise(spec))

    @torch.no_grad()
    def _activate(self, spec: dict[str, float]) -> None:
        if not spec:
            self._restore()
            return
        plan = self._plan(spec)  # built (and validated) before any weight changes
        self._restore()
        ops.scatter_weights_(plan.weights, plan.indices, plan.fused, None)
        for module, idx, delta in plan.side:
            set_side(module, idx, delta)
        self._current, self._active = plan, spec

    @torch.no_grad()
    def _restore(self) -> None:
        cur = self._current
        if cur is not None:
            ops.scatter_weights_(cur.weights, cur.indices, cur.base, None)
            for module, idx, delta in cur.side:
                set_side(module, idx[:0], delta[:0])
        self._current, self._active = None, None

    def deactivate(self) -> None:
        """Restore the base weights bit-exactly (only the positions the activation wrote)."""
        with self._exclusive("deactivate"):
            self._restore()

    def unload(self, name: str) -> None:
        """Forget an adapter (deactivating first if it is part of the active set)."""
        with self._exclusive("unload"):
            if name not in self._adapters:
                raise ShiraAdapterError(f"unload: adapter {name!r} is not loaded")
            if self._active is not None and name in self._active:
                self._restore()
            del self._adapters[name]
            self._table = None
            for key in [k for k in self._plans if any(n == name for n, _ in k)]:
                del self._plans[key]

    def overlap(self, a: str, b: str) -> int:
        """How many weight positions adapters `a` and `b` both touch (summed over layers):
        sparse masks barely overlap, which is why SHiRA adapters fuse with little loss."""
        for n in (a, b):
            if n not in self._adapters:
                raise ShiraAdapterError(f"overlap: adapter {n!r} is not loaded")
        shared = 0
        for ln, slot in self._adapters[a].items():
            other = self._adapters[b].get(ln)
            if other is not None:
                shared += int(torch.isin(slot.indices, other.indices.to(slot.indices.device)).sum())
        return shared

    def _parts(self, spec: Mapping[str, float], layer: str) -> list[tuple[Tensor, Tensor, float]]:
        return [(self._adapters[n][layer].indices, self._adapters[n][layer].delta, w)
                for n, w in sorted(spec.items()) if layer in self._adapters[n]]

    def per_request(self, names: Sequence[str | Mapping[str, float] | None]
                    ) -> AbstractContextManager[nn.Module]:
        """A mixed batch: row i of the batch (its first dimension) computes with `names[i]`, an
        adapter, a `{name: weight}` fusion, or None for the base, without fusing any: the fused
        weights keep the active adapter, and each row adds its own correction (its adapter
        minus the active one) through a sparse side path, nnz · tokens multiply-adds per layer.
        Which adapter a row uses is data: a new list of names compiles nothing.

        Threads: a mixed batch is a reader of the weights, like a request for the active
        adapter: mixed batches and such requests run together. It writes (alone) only to pack
        the corrections table, the first time after a switch, a load or an unload, or when a
        fusion (or weight) not in the table joins it; the table keeps the last `max_mixed` of
        them, so batches like earlier ones pack nothing."""
        return mixed.per_request(self, names)

    def __repr__(self) -> str:
        return f"AdapterBank(adapters={self.names}, active={self._active})"
