"""Mixed batches (`AdapterBank.per_request`): each row of a batch computes with its own adapter,
fusion or the base, without fusing any. The fused weights keep the active adapter; each row's
correction (its adapter minus the active one) is packed once per table into the served
layers' buffers (shared by all threads), and each thread's rows live in a `threading.local`
every served layer reads (`shira_fx.layer.served_forward` applies them).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attach import serve_beside
from ..errors import ShiraAdapterError
from ..layer import served_device, set_request_table
from ..targets import resolve_layer
from .gate import MIXED
from .slots import fuse


class RowsPerThread(threading.local):
    """The table entry of each row of the mixed batch this thread is serving (`.rows`, absent
    outside `per_request`). A served layer reads it through this object, the same for every
    layer of a bank, so a compiled graph takes the calling thread's rows as an input and many
    threads can serve mixed batches at once."""

    def __deepcopy__(self, memo: dict) -> RowsPerThread:
        return RowsPerThread()  # a copied model serves no batch

    def __reduce__(self):
        return RowsPerThread, ()  # nor does an unpickled one


@dataclass
class Table:
    """What the served layers' request buffers hold: the entries' specs (entry 0, {}, is the
    base), packed as corrections from `active`, on `device` (where the rows go)."""

    specs: list[dict[str, float]]
    active: dict[str, float]
    device: torch.device


@contextmanager
def per_request(bank: Any, names: Sequence[str | Mapping[str, float] | None]) -> Iterator[nn.Module]:
    """`AdapterBank.per_request` of `bank` (its docstring says what a mixed batch does)."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ShiraAdapterError(f"per_request: expected a non-empty list with one adapter (or None) "
                                f"per batch row, found {names!r}")
    specs = [None if n is None else bank._normalise(n) for n in names]
    gate = bank._gate
    if gate.held() is not None:
        raise ShiraAdapterError("per_request inside `with bank.using(...)` or another per_request "
                                "of the same thread; leave that block first")
    if gate.enter(lambda: _table_serves(bank, specs)):
        try:  # validated again under the gate: another thread may have unloaded an adapter
            specs = [None if n is None else bank._normalise(n) for n in names]
            _pack(bank, specs)
        except BaseException:
            gate.release_write()
            raise
        gate.release_write(then_read=True)
    table, active = bank._table, bank._active or {}
    rows = [-1 if (spec or {}) == active else table.specs.index(spec or {}) for spec in specs]
    bank._rows.rows = torch.tensor(rows, dtype=torch.int64, device=table.device)
    gate.local.held = (MIXED, 1)
    try:
        yield bank.model
    finally:
        del bank._rows.rows
        gate.local.held = None
        gate.release_read()


def _table_serves(bank: Any, specs: list[dict[str, float] | None]) -> bool:
    """Whether the packed table holds every spec, as corrections from the active adapter."""
    table = bank._table
    return (table is not None and table.active == (bank._active or {})
            and all(spec is None or spec in table.specs for spec in specs))


@torch.no_grad()
def _pack(bank: Any, specs: list[dict[str, float] | None]) -> None:
    """Pack, per layer, every table entry's correction (entry minus the active adapter) into
    the layer's request buffers. Entries: the base, each adapter, then the fusions and
    weights per_request has served, at most `max_mixed` (the oldest dropped first) beyond
    those of this batch."""
    modules = dict(bank.model.named_modules())
    layers = [(ln, resolve_layer(bank.model, ln, modules))
              for ln in sorted({ln for slots in bank._adapters.values() for ln in slots})]
    for ln, found in layers:
        if found.param != "weight" or found.conv:
            what = "a convolution" if found.conv else "a 3-D parameter (MoE experts)"
            raise ShiraAdapterError(f"per_request: {ln!r} is {what}; mixed batches serve linear layers only")
    singles = [{n: 1.0} for n in bank.names]
    served = [s for s in bank._served if all(n in bank._adapters for n in s)]
    wanted = [s for s in specs if s is not None and s not in singles]
    for spec in wanted:
        if spec not in served:
            served.append(spec)
    while len(served) > bank.max_mixed:  # drop the oldest this batch does not use
        old = next((s for s in served if s not in wanted), None)
        if old is None:
            break
        served.remove(old)
    bank._served = served
    entries = [{}] + singles + served
    active = bank._active or {}
    devices = []
    for ln, found in layers:
        module = found.module
        serve_beside(module, bank._rows, found.transposed)
        device = served_device(module)
        devices.append(device)
        minus_active = [(i, d, -w) for i, d, w in bank._parts(active, ln)]
        packed = [fuse(bank._parts(spec, ln) + minus_active, device)[:2] for spec in entries]
        sizes = torch.tensor([0] + [i.numel() for i, _ in packed], device=device)
        set_request_table(module, torch.cat([i for i, _ in packed]).to(torch.int32),
                          torch.cat([v for _, v in packed]), sizes.cumsum(0))
    bank._table = Table(entries, dict(active), devices[0] if devices else torch.device("cpu"))
