"""Training checkpoints: the adapter's values, the optimizer's state, the step and the LR
scheduler's state in one safetensors file, written atomically and never pickled.

Tensors (indices, values, optimizer moments) go into the safetensors body under flat keys;
everything else (step, param groups, scalar optimizer state, scheduler state, `extra`) is JSON
in the header metadata. Loading reads and checks the whole file before anything changes, so a
checkpoint of another adapter, another optimizer or a corrupt file raises ShiraAdapterError
with the adapter, optimizer and scheduler as they were; a resumed run then continues
bit-exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .adapter import SparseAdapter
from .atomic import atomic_save_file
from .errors import ShiraAdapterError

CHECKPOINT_FORMAT = "shira_fx-checkpoint"
CHECKPOINT_VERSION = 1


def _param_owners(adapter: SparseAdapter, optimizer: torch.optim.Optimizer) -> list[str]:
    """For each optimizer parameter in the optimizer's own order: the adapter layer whose values
    it is, or `other:<shape>` (a head trained beside the adapter). A checkpoint is only valid
    for an optimizer whose parameters line up the same way."""
    owner = {id(layer.values): name for name, layer in adapter.layers.items()}
    return [owner.get(id(p), "other:" + "x".join(str(s) for s in p.shape))
            for group in optimizer.param_groups for p in group["params"]]


def save_checkpoint(path: str | os.PathLike, adapter: SparseAdapter, optimizer: torch.optim.Optimizer,
                    step: int, scheduler: Any = None, extra: Any = None) -> None:
    """Write the values, the optimizer's state, `step`, the scheduler's state and `extra`
    (plain JSON data) so that a crash can resume exactly; atomic, so a crash during the save
    keeps the previous checkpoint."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ShiraAdapterError(f"save_checkpoint: step must be an int >= 0, found {step!r}")
    tensors = {f"adapter.{k}": v for k, v in adapter.state_dict().items()}
    state = optimizer.state_dict()
    scalars = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    try:
        meta = {
            "format": CHECKPOINT_FORMAT,
            "format_version": str(CHECKPOINT_VERSION),
            "step": str(step),
            "params": json.dumps(_param_owners(adapter, optimizer)),
            "optimizer_class": type(optimizer).__name__,
            "optimizer": json.dumps({"param_groups": state["param_groups"], "scalars": scalars}),
            "scheduler_class": "" if scheduler is None else type(scheduler).__name__,
            "scheduler": json.dumps(None if scheduler is None else scheduler.state_dict()),
            "extra": json.dumps(extra),
        }
    except (TypeError, ValueError) as exc:
        raise ShiraAdapterError(f"save_checkpoint: state that JSON cannot hold ({exc}); the "
                                "scheduler's state and `extra` must be plain data") from exc
    atomic_save_file(tensors, path, metadata=meta)


def _json(path: str, meta: dict[str, str], key: str) -> Any:
    if key not in meta:
        raise ShiraAdapterError(f"{path}: checkpoint metadata has no {key!r} entry")
    try:
        return json.loads(meta[key])
    except (ValueError, RecursionError) as exc:  # RecursionError: hostile nesting depth
        raise ShiraAdapterError(f"{path}: checkpoint metadata {key!r} is not valid JSON "
                                f"({str(exc)[:200]})") from exc


def _read(path: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    if not os.path.isfile(path):  # missing, a folder, or a FIFO/device that would block
        raise ShiraAdapterError(f"{path}: no such checkpoint file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            # copies: safetensors maps the file, and a tensor still backed by it dies with
            # SIGBUS once the file is truncated or rewritten in place (e.g. by `cp`)
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError, OverflowError, RuntimeError) as exc:
        raise ShiraAdapterError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                                f"{str(exc)[:300]}") from exc
    return meta, tensors


def _same_kind(saved: Any, current: Any) -> bool:
    """Does a JSON value fit where the live object holds `current`? (tuples come back as lists,
    ints may come back where floats were; None fits anywhere, as states fill in lazily)."""
    if saved is None or current is None:
        return True
    if isinstance(current, bool) or isinstance(saved, bool):
        return isinstance(current, bool) and isinstance(saved, bool)
    if isinstance(current, int | float):  # an int fits a float, NaN fits nothing, inf only a float
        if isinstance(saved, float):
            return isinstance(current, float) and not math.isnan(saved)
        return isinstance(saved, int)
    if isinstance(current, list | tuple):
        return isinstance(saved, list) and len(saved) == len(current) and all(
            _same_kind(s, c) for s, c in zip(saved, current, strict=True))
    if isinstance(current, dict):
        return isinstance(saved, dict) and set(saved) == set(current) and all(
            _same_kind(saved[k], current[k]) for k in current)
    return type(saved) is type(current)


def _check_adapter(path: str, tensors: dict[str, Tensor], adapter: SparseAdapter) -> dict[str, Tensor]:
    state = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
    return adapter.check_state(state, path)


def _check_optimizer(path: str, meta: dict[str, str], tensors: dict[str, Tensor],
                     adapter: SparseAdapter, optimizer: torch.optim.Optimizer) -> dict:
    if meta.get("optimizer_class") != type(optimizer).__name__:
        raise ShiraAdapterError(f"{path}: saved from a {meta.get('optimizer_class')!r:.80} optimizer, "
                                f"resuming a {type(optimizer).__name__}")
    owners = _param_owners(adapter, optimizer)
    if _json(path, meta, "params") != owners:
        raise ShiraAdapterError(f"{path}: the optimizer's parameters differ from the checkpoint's "
                                "(another adapter, other layers, or another order)")
    opt = _json(path, meta, "optimizer")
    if not isinstance(opt, dict) or set(opt) != {"param_groups", "scalars"} \
            or not isinstance(opt["scalars"], dict):
        raise ShiraAdapterError(f"{path}: malformed optimizer metadata")
    groups, current = opt["param_groups"], optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(current):
        raise ShiraAdapterError(f"{path}: the optimizer's parameter groups differ from the checkpoint's")
    for i, (saved, live) in enumerate(zip(groups, current, strict=True)):
        if not isinstance(saved, dict) or set(saved) != set(live) or saved["params"] != live["params"] \
                or not all(_same_kind(saved[k], live[k]) for k in live):
            raise ShiraAdapterError(f"{path}: parameter group {i} differs from the optimizer's "
                                    "(other keys, types or parameters)")
        for key, value in live.items():  # JSON turned tuples (betas) into lists
            if isinstance(value, tuple):
                saved[key] = tuple(saved[key])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    entries = [(k.removeprefix("optimizer."), v) for k, v in tensors.items() if k.startswith("optimizer.")]
    entries += list(opt["scalars"].items())
    for key, value in entries:
        pid_text, _, name = key.partition(".")
        if not pid_text.isdigit() or not name or not 0 <= int(pid_text) < len(params):
            raise ShiraAdapterError(f"{path}: optimizer state {key!r:.80} names no parameter of the "
                                    f"optimizer (it has {len(params)})")
        pid = int(pid_text)
        if isinstance(value, Tensor):
            if value.dim() > 0 and value.shape != params[pid].shape:
                raise ShiraAdapterError(f"{path}: optimizer state {name!r} of parameter {pid} has shape "
                                        f"{tuple(value.shape)}, the parameter {tuple(params[pid].shape)}")
            if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
                raise ShiraAdapterError(f"{path}: optimizer state {name!r} of parameter {pid} holds "
                                        "NaN or Inf")
        elif value is not None and not isinstance(value, bool | int | float | str):
            raise ShiraAdapterError(f"{path}: optimizer state {name!r} of parameter {pid} is "
                                    f"{type(value).__name__}, not a number")
        if name in state.setdefault(pid, {}):
            raise ShiraAdapterError(f"{path}: optimizer state {name!r} of parameter {pid} twice")
        state[pid][name] = value
    kinds: dict[str, set] = {}  # a moment is per-element for every parameter or scalar for all
    for entries_of in state.values():
        for name, value in entries_of.items():
            kinds.setdefault(name, set()).add(value.dim() > 0 if isinstance(value, Tensor) else None)
    mixed = sorted(name for name, k in kinds.items() if len(k) > 1)
    if mixed:
        raise ShiraAdapterError(f"{path}: optimizer state {mixed[:3]} is a tensor of the parameter's "
                                "shape for some parameters and not for others")
    return {"state": state, "param_groups": groups}


def _check_scheduler(path: str, meta: dict[str, str], scheduler: Any) -> Any:
    saved = _json(path, meta, "scheduler")
    if (saved is None) != (scheduler is None):
        raise ShiraAdapterError(f"{path}: the checkpoint {'has no' if saved is None else 'has'} "
                                "scheduler state but the caller passes "
                                f"{'one' if scheduler is not None else 'none'}")
    if scheduler is None:
        return None
    if meta.get("scheduler_class") != type(scheduler).__name__:
        raise ShiraAdapterError(f"{path}: saved from a {meta.get('scheduler_class')!r:.80} scheduler, "
                                f"resuming a {type(scheduler).__name__}")
    if not _same_kind(saved, scheduler.state_dict()):
        raise ShiraAdapterError(f"{path}: the scheduler state differs in keys or types from the "
                                f"{type(scheduler).__name__}'s")
    return saved


def load_checkpoint(path: str | os.PathLike, adapter: SparseAdapter, optimizer: torch.optim.Optimizer,
                    scheduler: Any = None) -> int:
    """Restore what `save_checkpoint` wrote into a freshly built adapter, optimizer and scheduler;
    returns the step. Everything is read and checked first, and anything that still fails
    while applying is rolled back, so a bad file leaves all three unchanged."""
    path = os.fspath(path)
    meta, tensors = _read(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ShiraAdapterError(f"{path}: not a shira_fx checkpoint (format={meta.get('format')!r:.80})")
    if meta.get("format_version") != str(CHECKPOINT_VERSION):
        raise ShiraAdapterError(f"{path}: checkpoint format_version {meta.get('format_version')!r:.80} "
                                f"is not supported (this shira_fx reads {CHECKPOINT_VERSION})")
    step = _json(path, meta, "step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ShiraAdapterError(f"{path}: step {step!r:.80} is not an int >= 0")
    _json(path, meta, "extra")
    stray = [k for k in tensors if not k.startswith(("adapter.", "optimizer."))]
    if stray:
        raise ShiraAdapterError(f"{path}: tensors a checkpoint does not hold: {stray[:5]}")
    adapter_state = _check_adapter(path, tensors, adapter)
    opt_state = _check_optimizer(path, meta, tensors, adapter, optimizer)
    sched_state = _check_scheduler(path, meta, scheduler)

    values_before = [layer.values.detach().clone() for layer in adapter.layers.values()]
    opt_before = copy.deepcopy(optimizer.state_dict())
    sched_before = None if scheduler is None else copy.deepcopy(scheduler.state_dict())
    try:
        adapter.load_state_dict(adapter_state)
        optimizer.load_state_dict(opt_state)
        if scheduler is not None:
            scheduler.load_state_dict(sched_state)
    except Exception as exc:  # what the checks above could not foresee: put everything back
        with torch.no_grad():
            for layer, before in zip(adapter.layers.values(), values_before, strict=True):
                layer.values.copy_(before)
        adapter.sync()
        optimizer.load_state_dict(opt_before)
        if scheduler is not None:
            scheduler.load_state_dict(sched_before)
        raise ShiraAdapterError(f"{path}: the checkpoint does not fit this adapter/optimizer/"
                                f"scheduler ({type(exc).__name__}: {str(exc)[:300]}); nothing "
                                "was changed") from exc
    return step


def checkpoint_extra(path: str | os.PathLike) -> Any:
    """The `extra` data a checkpoint was saved with (epoch, data-loader position, ...)."""
    path = os.fspath(path)
    meta, _ = _read(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ShiraAdapterError(f"{path}: not a shira_fx checkpoint (format={meta.get('format')!r:.80})")
    return _json(path, meta, "extra")
