"""Training checkpoints: the adapter's values, the optimizer's state, the step and the LR
scheduler's state in one safetensors file, written atomically and never pickled.

Tensors (values, indices, optimizer moments) go into the safetensors body under flat keys;
everything else (step, param groups, scalar optimizer state, scheduler state) is JSON in the
header metadata. Resuming from it continues bit-exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .adapter import SparseAdapter
from .adapter_files import atomic_save_file
from .errors import ShiraAdapterError

CHECKPOINT_FORMAT = "shira_fx-checkpoint"


def _flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(path: str | os.PathLike, adapter: SparseAdapter, optimizer: torch.optim.Optimizer,
                    step: int, scheduler: Any = None, extra: dict[str, Any] | None = None) -> None:
    """Write values, optimizer state, `step`, the scheduler's state and `extra` (JSON-able)."""
    tensors = {f"adapter.{k}": v for k, v in adapter.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    try:
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": json.dumps(int(step)),
            "optimizer": json.dumps(opt_meta),
            "optimizer_class": type(optimizer).__name__,
            "scheduler": json.dumps(None if scheduler is None else scheduler.state_dict()),
            "extra": json.dumps(extra),
        }
    except TypeError as exc:
        raise ShiraAdapterError(f"save_checkpoint: state that JSON cannot hold ({exc}); "
                                "scheduler lambdas and extra must be plain data") from exc
    atomic_save_file(tensors, path, metadata=meta)


def load_checkpoint(path: str | os.PathLike, adapter: SparseAdapter, optimizer: torch.optim.Optimizer,
                    scheduler: Any = None) -> int:
    """Restore what `save_checkpoint` wrote; returns the step. Everything is read and checked
    before the adapter, optimizer or scheduler changes, so a bad file changes nothing."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ShiraAdapterError(f"{path}: not a readable checkpoint ({exc})") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ShiraAdapterError(f"{path}: not a shira_fx checkpoint (format={meta.get('format')!r})")
    if meta.get("optimizer_class") != type(optimizer).__name__:
        raise ShiraAdapterError(f"{path}: saved from a {meta.get('optimizer_class')} optimizer, "
                                f"resuming a {type(optimizer).__name__}")
    try:
        step = json.loads(meta["step"])
        opt_meta = json.loads(meta["optimizer"])
        sched_state = json.loads(meta["scheduler"])
        groups, scalars = opt_meta["param_groups"], opt_meta["scalars"]
    except (KeyError, ValueError, TypeError) as exc:
        raise ShiraAdapterError(f"{path}: malformed checkpoint metadata ({exc})") from exc
    if not isinstance(step, int) or isinstance(step, bool):
        raise ShiraAdapterError(f"{path}: step {step!r} is not an int")
    if (sched_state is None) != (scheduler is None):
        raise ShiraAdapterError(f"{path}: the checkpoint {'has' if sched_state else 'has no'} "
                                "scheduler state but the caller passes "
                                f"{'one' if scheduler is not None else 'none'}")

    adapter_state = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
    # optimizer state keyed as the optimizer numbers its parameters (across param groups)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != [
            len(g["params"]) for g in optimizer.param_groups]:
        raise ShiraAdapterError(f"{path}: the optimizer's parameter groups differ from the checkpoint's")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in scalars.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in state.items():
        if not 0 <= pid < len(params):
            raise ShiraAdapterError(f"{path}: optimizer state for parameter {pid}, the optimizer has "
                                    f"{len(params)}")
        for name, value in entries.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != params[pid].shape:
                raise ShiraAdapterError(f"{path}: optimizer state {name!r} of parameter {pid} has shape "
                                        f"{tuple(value.shape)}, the parameter {tuple(params[pid].shape)}")
    for saved, current in zip(groups, optimizer.param_groups, strict=True):
        for key, value in current.items():  # JSON turned tuples (betas) into lists
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])

    adapter.load_state_dict(adapter_state)  # validates indices and values before copying
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)
    return step
