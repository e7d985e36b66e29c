"""AdapterBank: many SHiRA adapters beside one base model, switched and fused in place.

Switching is O(nnz): `activate` restores the positions the previous
activation touched from saved base values, then writes `base + Σ wᵢ·deltaᵢ` at the new
positions — two fused scatter launches over all layers, no weight-sized tensor, no
recompilation (weights change in place; compiled inference graphs read them as inputs).
Because restoring writes saved base values, the base is bit-exact after any sequence.
"""

from __future__ import annotations

import math
import os
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import ops
from .adapter import SparseAdapter
from .adapter_files import StoredAdapter, fingerprint, load_adapter
from .errors import ShiraAdapterError, ShiraConfigError
from .quantized import base_forward, quantized_kind
from .targets import resolve_layer

SIDE_INDICES, SIDE_VALUES = "shira_side_indices", "shira_side_values"
# a mixed batch (`per_request`): every table entry's correction, packed (shared by all threads)
REQUEST = ("shira_request_indices", "shira_request_values", "shira_request_offsets")


class _RowsPerThread(threading.local):
    """The table entry of each row of the mixed batch this thread is serving (`.rows`, absent
    outside `per_request`). A served layer reads it through this object, the same for every
    layer of a bank, so a compiled graph takes the calling thread's rows as an input and many
    threads can serve mixed batches at once."""

    def __deepcopy__(self, memo: dict) -> _RowsPerThread:
        return _RowsPerThread()  # a copied model serves no batch


@dataclass
class _Slot:
    """One adapter's data for one layer: int64 indices, true base values (weight dtype) and
    the fp32 delta."""

    indices: Tensor
    base: Tensor
    delta: Tensor


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


@dataclass
class _Table:
    """What the served layers' REQUEST buffers hold: the entries' specs (entry 0, {}, is the
    base), packed as corrections from `active`, on `device` (where the rows go)."""

    specs: list[dict[str, float]]
    active: dict[str, float]
    device: torch.device


_MIXED = "per_request"  # what a thread inside per_request holds of the gate


def _served_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Forward of a module a bank serves beside its weight: the layer's own forward (for a
    quantized base, the library's op), plus the active adapter beside it when the weight cannot
    hold it, plus each row's own correction when this thread serves a mixed batch (on the CPU,
    a plain weight's whole linear per adapter: `ops.request_linear`); with neither, exactly the
    base layer's output."""
    rows = getattr(self.__dict__["_shira_requests"], "rows", None)
    if rows is not None:
        if x.shape[0] != rows.numel():
            raise ShiraAdapterError(f"per_request: a served layer got an input of shape {tuple(x.shape)}; "
                                    f"expected the batch's {rows.numel()} rows first")
        rows = rows.to(x.device)
    weight = self.__dict__["_shira_served_weight"]
    if rows is not None and weight is not None and x.device.type == "cpu":  # the whole linear per adapter
        return ops.request_linear(x, self._parameters[weight], self.bias, rows, self._buffers[REQUEST[0]],
                                  self._buffers[REQUEST[1]], self._buffers[REQUEST[2]],
                                  self.__dict__["_shira_served_transposed"])
    y = base_forward(self, x)
    indices = self._buffers[SIDE_INDICES]
    if indices.numel():
        y = y + ops.side_linear(x, self._buffers[SIDE_VALUES], indices, y.shape[-1], x.shape[-1]).to(y.dtype)
    if rows is not None:
        x2 = x.reshape(-1, x.shape[-1])
        seg_starts = torch.arange(rows.numel() + 1, device=x.device) * (x2.shape[0] // rows.numel())
        side = ops.side_segmented(x2, seg_starts, rows, self._buffers[REQUEST[0]], self._buffers[REQUEST[1]],
                                  self._buffers[REQUEST[2]], y.shape[-1], x.shape[-1],
                                  self.__dict__["_shira_served_transposed"])
        y = y + side.reshape(y.shape).to(y.dtype)
    return y


def _serve_beside(module: nn.Module, requests: _RowsPerThread, transposed: bool = False) -> None:
    """Give a module the (empty) side paths the bank fills: the active adapter's for a
    quantized base, each row's correction in a mixed batch (`requests`: the bank's rows)."""
    if SIDE_INDICES in module._buffers:
        if module.__dict__["_shira_requests"] is not requests:
            raise ShiraAdapterError("AdapterBank: another bank already serves this model's layers; "
                                    "one model takes one bank")
        return
    if "_shira_layer" in module.__dict__:
        raise ShiraAdapterError("AdapterBank: a layer of this model carries a training adapter; "
                                "call adapter.remove() first")
    device = next((t.device for t in module.parameters()), torch.device("cpu"))
    empty = dict(dtype=torch.int32, device=device)
    module.register_buffer(SIDE_INDICES, torch.empty(0, **empty), persistent=False)
    module.register_buffer(SIDE_VALUES, torch.empty(0, device=device), persistent=False)
    for name, dtype in zip(REQUEST, (torch.int32, torch.float32, torch.int64), strict=True):
        module.register_buffer(name, torch.empty(0, dtype=dtype, device=device), persistent=False)
    module.__dict__["_shira_requests"] = requests
    module.__dict__["_shira_served_transposed"] = transposed
    # a plain weight (not quantized): on the CPU a mixed batch runs the whole linear per adapter
    weight = module._parameters.get("weight")
    plain = (isinstance(module, nn.Linear) or transposed) and quantized_kind(module) is None and (
        type(weight) is nn.Parameter)
    module.__dict__["_shira_served_weight"] = "weight" if plain else None
    module.forward = types.MethodType(_served_forward, module)


def _delta(parts: list[tuple[Tensor, Tensor, float]], device) -> tuple[Tensor, Tensor]:
    """Σ weight · delta over (indices, delta, weight) parts: sorted unique int64 indices and
    the fp32 sum there (in the order given: the same order a dense reference adds them)."""
    if not parts:
        return torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, device=device)
    idx, inverse = torch.unique(torch.cat([i.to(device).long() for i, _, _ in parts]), return_inverse=True)
    total = torch.zeros(idx.numel(), dtype=torch.float32, device=device)
    total.index_add_(0, inverse, torch.cat([d.to(device).float() * w for _, d, w in parts]))
    return idx, total


class _Gate:
    """The bank's reader-writer gate. Readers are requests computing with the active adapter;
    writers are switches (a request for another adapter, or a bare activate/deactivate/load/
    unload). Many readers run together; a writer runs alone, once the readers have left.

    Policy (why nothing starves): a request that finds its adapter active joins the readers
    only while no switch is waiting; otherwise it waits behind the switch, so a stream of
    requests for a busy adapter cannot hold a switch off. A request that had to queue for a
    switch may join its adapter's readers as soon as that adapter is active (each does so
    once, so this cannot hold a switch off either). Switches among themselves are not
    ordered: whichever gets the lock first when the gate frees goes first.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.readers = 0  # requests inside their block
        self.writing = False  # a switch is changing the weights
        self.waiting = 0  # switches waiting for the gate (new readers queue behind them)
        self.blocked = 0  # requests waiting to enter (observability: tests, stats)
        self.local = threading.local()  # per thread: the spec it holds inside `using`, and depth

    def held(self) -> tuple[dict | None, int] | None:
        return getattr(self.local, "held", None)

    def enter(self, ready: Callable[[], bool]) -> bool:
        """Wait for the gate as a request: join the readers once `ready()` holds (checked under
        the gate: what readers need is in place), or become the one writer that makes it hold.
        True means writer: do the switch, then `release_write(then_read=True)`."""
        queued = False
        with self.cond:
            self.blocked += 1
            try:
                while True:
                    if not self.writing:
                        if ready():
                            if queued or not self.waiting:
                                self.readers += 1
                                return False
                        elif not self.readers:
                            self.writing = True
                            return True
                    if not queued and not ready():  # queue as a switch
                        self.waiting += 1
                        queued = True
                    self.cond.wait()
            finally:
                self.blocked -= 1
                if queued:
                    self.waiting -= 1
                    if not self.waiting:  # readers held back by waiting switches may enter
                        self.cond.notify_all()

    def acquire_write(self) -> None:
        with self.cond:
            self.waiting += 1
            try:
                while self.writing or self.readers:
                    self.cond.wait()
            except BaseException:  # interrupted: readers held back by this switch may enter
                self.waiting -= 1
                self.cond.notify_all()
                raise
            self.waiting -= 1
            self.writing = True

    def release_write(self, then_read: bool = False) -> None:
        """End a switch; `then_read` turns the switcher into a reader of what it activated,
        atomically, so nothing can switch it away before its forward runs."""
        with self.cond:
            self.writing = False
            if then_read:
                self.readers += 1
            self.cond.notify_all()

    def release_read(self) -> None:
        with self.cond:
            self.readers -= 1
            if not self.readers:  # only an empty gate lets anyone new in
                self.cond.notify_all()


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
    """

    def __init__(self, model: nn.Module, keep_on_device: bool = True, max_plans: int = 8,
                 max_mixed: int = 64):
        for what, n in (("max_plans", max_plans), ("max_mixed", max_mixed)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ShiraConfigError(f"AdapterBank: {what} must be a positive int, found {n!r}")
        self.model = model
        self.keep_on_device = keep_on_device
        self.max_plans = max_plans
        self.max_mixed = max_mixed
        self._adapters: dict[str, dict[str, _Slot]] = {}
        self._active: dict[str, float] | None = None
        self._current: _Plan | None = None
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()
        self._served: list[dict[str, float]] = []  # fusions and weights per_request has served
        self._table: _Table | None = None  # what the layers' REQUEST buffers hold (None: stale)
        self._requests = _RowsPerThread()
        self._gate = _Gate()

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
            if held[0] is _MIXED:
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
        for layer_name, spec in stored.layers.items():
            found = resolve_layer(self.model, layer_name)
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
                if fingerprint(idx, base) != spec.fingerprint:
                    raise stored.error("base fingerprint differs: the adapter was trained on "
                                       "another base model (or this model's weights there are "
                                       "not its base: an adapter still fused by training? "
                                       "call adapter.remove() first)", layer_name)
            slots[layer_name] = self._keep(_Slot(idx, base, delta.to(w.device)))
        for module in beside:
            _serve_beside(module, self._requests)
        self._adapters[name] = slots
        self._table = None

    def _keep(self, slot: _Slot) -> _Slot:
        if self.keep_on_device or slot.indices.device.type == "cpu":
            return slot
        pin = torch.cuda.is_available()
        host = [t.cpu().pin_memory() if pin else t.cpu() for t in (slot.indices, slot.base, slot.delta)]
        return _Slot(*host)

    @torch.no_grad()
    def _true_base(self, layer_name: str, w: Tensor, idx: Tensor) -> Tensor:
        """Base values at idx: read from the weight, except where the current activation
        wrote, where the saved base is taken instead."""
        base = w.view(-1)[idx].clone()
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
        for ln in layer_names:
            found = resolve_layer(self.model, ln)
            w = found.weight
            parts = [(self._adapters[n][ln], spec[n]) for n in names if ln in self._adapters[n]]
            if found.quantized:  # nothing is written into it: only a device and dtype are read
                w = parts[0][0].delta
            if len(parts) == 1:
                slot, weight = parts[0]
                idx, base = slot.indices.to(w.device), slot.base.to(w.device)
                delta = slot.delta.to(w.device) * weight
            else:
                cat_idx = torch.cat([s.indices.to(w.device) for s, _ in parts])
                idx, inverse = torch.unique(cat_idx, return_inverse=True)
                # fp32 sum in adapter-name order: the same order a dense reference adds them
                delta = torch.zeros(idx.numel(), dtype=torch.float32, device=w.device)
                delta.index_add_(0, inverse, torch.cat([s.delta.to(w.device) * wt for s, wt in parts]))
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
            module._buffers[SIDE_INDICES], module._buffers[SIDE_VALUES] = idx, delta
        self._current, self._active = plan, spec

    @torch.no_grad()
    def _restore(self) -> None:
        cur = self._current
        if cur is not None:
            ops.scatter_weights_(cur.weights, cur.indices, cur.base, None)
            for module, idx, delta in cur.side:
                module._buffers[SIDE_INDICES], module._buffers[SIDE_VALUES] = idx[:0], delta[:0]
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

    @contextmanager
    def per_request(self, names: Sequence[str | Mapping[str, float] | None]) -> Iterator[nn.Module]:
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
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ShiraAdapterError(f"per_request: expected a non-empty list with one adapter (or None) "
                                    f"per batch row, found {names!r}")
        specs = [None if n is None else self._normalise(n) for n in names]
        gate = self._gate
        if gate.held() is not None:
            raise ShiraAdapterError("per_request inside `with bank.using(...)` or another per_request "
                                    "of the same thread; leave that block first")
        if gate.enter(lambda: self._table_serves(specs)):
            try:  # validated again under the gate: another thread may have unloaded an adapter
                specs = [None if n is None else self._normalise(n) for n in names]
                self._pack(specs)
            except BaseException:
                gate.release_write()
                raise
            gate.release_write(then_read=True)
        table, active = self._table, self._active or {}
        rows = [-1 if (spec or {}) == active else table.specs.index(spec or {}) for spec in specs]
        self._requests.rows = torch.tensor(rows, dtype=torch.int64, device=table.device)
        gate.local.held = (_MIXED, 1)
        try:
            yield self.model
        finally:
            del self._requests.rows
            gate.local.held = None
            gate.release_read()

    def _table_serves(self, specs: list[dict[str, float] | None]) -> bool:
        """Whether the packed table holds every spec, as corrections from the active adapter."""
        table = self._table
        return (table is not None and table.active == (self._active or {})
                and all(spec is None or spec in table.specs for spec in specs))

    @torch.no_grad()
    def _pack(self, specs: list[dict[str, float] | None]) -> None:
        """Pack, per layer, every table entry's correction (entry minus the active adapter) into
        the layer's REQUEST buffers. Entries: the base, each adapter, then the fusions and
        weights per_request has served, at most `max_mixed` (the oldest dropped first) beyond
        those of this batch."""
        layers = [(ln, resolve_layer(self.model, ln))
                  for ln in sorted({ln for slots in self._adapters.values() for ln in slots})]
        for ln, found in layers:
            if found.param != "weight":
                raise ShiraAdapterError(f"per_request: {ln!r} is a 3-D parameter (MoE experts); "
                                        "mixed batches serve linear layers only")
        singles = [{n: 1.0} for n in self.names]
        served = [s for s in self._served if all(n in self._adapters for n in s)]
        wanted = [s for s in specs if s is not None and s not in singles]
        for spec in wanted:
            if spec not in served:
                served.append(spec)
        while len(served) > self.max_mixed:  # drop the oldest this batch does not use
            old = next((s for s in served if s not in wanted), None)
            if old is None:
                break
            served.remove(old)
        self._served = served
        entries = [{}] + singles + served
        active = self._active or {}
        devices = []
        for ln, found in layers:
            module = found.module
            _serve_beside(module, self._requests, found.transposed)
            device = module._buffers[SIDE_INDICES].device
            devices.append(device)
            minus_active = [(i, d, -w) for i, d, w in self._parts(active, ln)]
            packed = [_delta(self._parts(spec, ln) + minus_active, device) for spec in entries]
            sizes = torch.tensor([0] + [i.numel() for i, _ in packed], device=device)
            tensors = (torch.cat([i for i, _ in packed]).to(torch.int32), torch.cat([v for _, v in packed]),
                       sizes.cumsum(0))
            for name, tensor in zip(REQUEST, tensors, strict=True):
                module._buffers[name] = tensor
        self._table = _Table(entries, dict(active), devices[0] if devices else torch.device("cpu"))

    def __repr__(self) -> str:
        return f"AdapterBank(adapters={self.names}, active={self._active})"


@torch.no_grad()
def export_dense(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """For deployment: replace, in place, every quantized linear by a plain `nn.Linear` in
    `dtype` holding its dequantized weight plus the adapter riding beside it (a training
    adapter's values or the bank's active adapter), so the model runs anywhere at the base
    model's cost. Returns `model`; the quantized layers are gone afterwards."""
    from .quantized import dequantized_weight, logical_shape, quantized_kind

    swaps = []
    for name, module in model.named_modules():
        if quantized_kind(module) is None:
            continue
        weight = dequantized_weight(module).float()
        if "_shira_layer" in module.__dict__:
            idx, vals = module._buffers["shira_indices"], module._parameters["shira_values"]
        else:
            idx, vals = module._buffers.get(SIDE_INDICES), module._buffers.get(SIDE_VALUES)
        if idx is not None and idx.numel():
            weight.view(-1).index_add_(0, idx.long(), vals.detach().float())
        out_f, in_f = logical_shape(module)
        bias = getattr(module, "bias", None)
        dense = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias.detach())
        swaps.append((name, dense))
    for name, dense in swaps:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, dense)
    return model
