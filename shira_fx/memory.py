"""A dispatch-level tracker of live tensor bytes: the same yardstick for eager, compiled
(non-Inductor) and PEFT code, independent of any allocator, so CPU runs can compare peaks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .layer import structure_of
from .quantized import packed_tensors


def _dense_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The strided tensors that hold a tensor's memory (a sparse tensor has several)."""
    if t.layout == torch.strided:
        return [t]
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.crow_indices(), t.col_indices(), t.values()]
    if t.layout == torch.sparse_coo:
        return [t._indices(), t._values()]
    return [t.ccol_indices(), t.row_indices(), t.values()]


@dataclass
class Allocation:
    op: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int


@dataclass
class LiveTensorTracker(TorchDispatchMode):
    """While active, every storage an op creates is tracked until it is freed.

    `peak_bytes` is the high-water mark of the bytes created inside the block and still alive;
    `allocations` lists each new storage (op, shape, numel), so a test can assert that no op
    ever made a weight-sized tensor. Storages of op inputs (parameters, in-place results)
    never count as new.
    """

    peak_bytes: int = 0
    live_bytes: int = 0
    allocations: list[Allocation] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.live_bytes -= self._live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {
            s._cdata
            for a in tree_flatten((args, kwargs))[0]
            if isinstance(a, torch.Tensor)
            for p in _dense_parts(a)
            for s in [p.untyped_storage()]
        }
        out = func(*args, **kwargs)
        self._sweep()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            for part in _dense_parts(t):
                s = part.untyped_storage()
                key = s._cdata
                if key in inputs or key in self._live or s.nbytes() == 0:
                    continue
                self._live[key] = (StorageWeakRef(s), s.nbytes())
                self.live_bytes += s.nbytes()
                self.allocations.append(
                    Allocation(str(func), tuple(part.shape), part.numel(), s.nbytes())
                )
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out

    def largest(self) -> Allocation | None:
        return max(self.allocations, key=lambda a: a.numel, default=None)


def resident_state(model: torch.nn.Module) -> list[torch.Tensor]:
    """What a model keeps whatever backward does: its parameters and buffers, each prepared
    layer's mask structure (a plain attribute, not a buffer) and each quantized layer's
    quantization state (bitsandbytes keeps its scales there). Pass it as `exclude`."""
    kept = [t for m in model.modules() for t in (*structure_of(m), *packed_tensors(m))]
    return list(model.parameters()) + list(model.buffers()) + kept


def saved_tensor_bytes(run, exclude=()) -> tuple[int, object]:
    """Bytes of the unique storages autograd saves for backward while `run()` executes (the
    activations a training step holds), excluding the storages of `exclude` (parameters and
    buffers). Works through compiled graphs too, since AOTAutograd saves through autograd."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        for part in _dense_parts(t):
            s = part.untyped_storage()
            if s._cdata not in skip:
                seen[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out


def step_peak_bytes(model, params, batch: dict, on_optimizer=None) -> int:
    """Peak live tensor bytes of one eager training step: `model(**batch).loss`, backward and
    an AdamW step over `params` (`on_optimizer(opt)` runs first, e.g. `adapter.attach`). The
    learning rate is 0, so measuring leaves the parameters as they were."""
    opt = torch.optim.AdamW(params or [torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    if on_optimizer is not None:
        on_optimizer(opt)
    with LiveTensorTracker() as tracker:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return tracker.peak_bytes
