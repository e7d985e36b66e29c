"""`shira_fx.verify`: a whole model's compiled gradients against eager, layer by layer (the
comparison each compiled training graph runs at its first call, `compile/verify.py`, on a
user's own model and batch)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import ShiraTrainingError
from ..layer import layers_of
from ..masks import default_loss
from .backend import ShiraBackend
from .verify import Verification, compare, restore_rng, rng_state, tolerance_for


def verify(model: nn.Module, batch, loss_fn: Callable | None = None, inner: str = "inductor",
           tol: float | None = None) -> Verification:
    """Compare, per prepared layer, the values' gradients of `model` compiled with the shira_fx
    backend (`inner`, the graph checks of the backend off) with the eager model's, on `batch`
    (`loss_fn(model, batch)`; default `model(**batch).loss`). Nothing is trained: the
    gradients are taken with `torch.autograd.grad`. `tol` (default: by the parameters' dtypes;
    pass 5e-2 for a loss computed under bf16 autocast) bounds each layer's relative error.
    Returns the per-layer comparison (`.ok`, `.table()`)."""
    loss_fn = loss_fn or default_loss
    values, names = [], []
    for module in model.modules():
        for layer in layers_of(module).values():
            values.append(layer.values)
            names.append(layer.name)
    if not values:
        raise ShiraTrainingError(f"shira_fx.verify: {type(model).__name__} carries no prepared layer")
    rng = rng_state()
    try:
        with torch.enable_grad():
            want = torch.autograd.grad(loss_fn(model, batch), values, allow_unused=True)
            restore_rng(rng)
            compiled = torch.compile(model, backend=ShiraBackend(inner, verify=False))
            got = torch.autograd.grad(loss_fn(compiled, batch), values, allow_unused=True)
    finally:
        restore_rng(rng)
    tol = tolerance_for({p.dtype for p in model.parameters()}) if tol is None else tol
    return compare(names, got, want, tol)
