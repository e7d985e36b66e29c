"""`train_step`: a drop-in decorator that turns "compute the loss" into a full SHiRA step."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from .adapter import SparseAdapter, check_backward_reached
from .errors import ShiraTrainingError


def _grad_state(params: list[torch.Tensor]) -> list[tuple[int, int] | None]:
    return [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def train_step(
    adapter: SparseAdapter,
    optimizer: torch.optim.Optimizer,
    *,
    accumulate: int = 1,
    max_grad_norm: float | None = None,
    scheduler=None,
    scaler: torch.amp.GradScaler | None = None,
) -> Callable[[Callable], Callable[..., float]]:
    """Decorate a function that returns the loss; each call then runs backward (scaled by
    1/accumulate, and by `scaler` for fp16 autocast), and every `accumulate` calls unscales,
    clips, steps the optimizer (whose post-step hook writes `base + values` into the fused
    weights), steps the scheduler and zeroes grads.

    A step that calls `backward()` itself is detected (its values' grads changed during the
    call) and not back-propagated twice. A non-finite loss, or a non-finite gradient of any
    parameter the optimizer holds, raises ShiraTrainingError before anything is applied (with
    a scaler, an overflowing step is skipped and the scale lowered, as GradScaler does). After
    the first backward, a layer whose values got no gradient is an error naming it.
    """
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"train_step: accumulate must be an int >= 1, found {accumulate!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"train_step: max_grad_norm must be > 0, found {max_grad_norm!r}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise ValueError(f"train_step: scaler must be a torch.amp.GradScaler, found {type(scaler).__name__}")
    adapter.check_optimizer(optimizer)

    def decorate(fn: Callable) -> Callable[..., float]:
        calls = 0
        checked = False

        @functools.wraps(fn)
        def step(*args, **kwargs) -> float:
            nonlocal calls, checked
            params = list(adapter.parameters())
            before = _grad_state(params)
            loss = fn(*args, **kwargs)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ShiraTrainingError(
                    f"{fn.__name__} must return the scalar loss tensor, found {type(loss).__name__}"
                    + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
                )
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ShiraTrainingError(
                    f"{fn.__name__} returned a non-finite loss ({value}) at call {calls + 1}; "
                    "no backward or optimizer step was run"
                )
            if _grad_state(params) == before:
                if not loss.requires_grad:
                    raise ShiraTrainingError(
                        f"{fn.__name__}: the loss does not depend on the adapter's values "
                        "(was the model prepared, and is grad enabled?)"
                    )
                scaled = loss / accumulate if accumulate > 1 else loss
                (scaled if scaler is None else scaler.scale(scaled)).backward()
            after = _grad_state(params)
            if after == before:
                raise ShiraTrainingError(
                    f"{fn.__name__}: backward reached none of the adapter's values, so training "
                    "would silently do nothing; shira_fx.explain(backend) says which layers the "
                    "compiled graph left dense and why"
                )
            if not checked:
                check_backward_reached({name: was != now for name, was, now in zip(
                    adapter.layers, before, after, strict=True)}, fn.__name__)
                checked = True
            calls += 1
            if calls % accumulate:
                return value
            if scaler is not None:
                scaler.unscale_(optimizer)
            with_grads = [p for p in _optimizer_params(optimizer) if p.grad is not None]
            if max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(with_grads, max_grad_norm)
                finite = bool(torch.isfinite(norm))
            else:
                finite = all(bool(torch.isfinite(p.grad).all()) for p in with_grads)
            if not finite:
                if scaler is not None:  # fp16 overflow: GradScaler skips the step, lowers the scale
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    return value
                optimizer.zero_grad(set_to_none=True)
                raise ShiraTrainingError(
                    f"non-finite gradient at call {calls}; the step was skipped and grads cleared"
                )
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            return value

        return step

    return decorate
