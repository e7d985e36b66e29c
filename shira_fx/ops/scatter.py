"""The mutating `scatter_` that syncs fused weights and switches adapters, always outside autograd."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from .checks import INTS, check

# -- sync and switching ----------------------------------------------------------------------


@torch.library.custom_op("shira_fx::scatter_", mutates_args=("weights",))
def scatter_(
    weights: list[Tensor], indices: list[Tensor], base: list[Tensor], delta: list[Tensor], scale: float
) -> None:
    """In place, per layer: `W.flat[idx] = base + scale * delta` (or `base` when delta is empty).

    Assigns rather than accumulates, so the fused weights never drift from `base + values`,
    and restoring the saved base values is bit-exact. Touches only the indexed elements.
    """
    kernels.scatter_layers_(weights, indices, base, delta or None, scale)


@scatter_.register_fake
def _(weights, indices, base, delta, scale) -> None:
    op = "scatter_"
    check(len(indices) == len(weights) and len(base) == len(weights) and len(delta) in (0, len(weights)),
          op, f"one entry per layer in every list, found {len(weights)} weights, {len(indices)} "
          f"indices, {len(base)} base, {len(delta)} delta")
    for i, (w, idx, b) in enumerate(zip(weights, indices, base, strict=True)):
        check(idx.dim() == 1 and idx.dtype in INTS, op, f"indices[{i}] must be 1-D int32/int64")
        check(b.shape == idx.shape and b.dtype.is_floating_point, op,
              f"base[{i}] must be a float tensor of shape {tuple(idx.shape)}, found {b.dtype} "
              f"{tuple(b.shape)}")
        if delta:
            check(delta[i].shape == idx.shape, op, f"delta[{i}] must have shape {tuple(idx.shape)}")
        for name, t in (("indices", idx), ("base", b)):
            check(t.device == w.device, op, f"{name}[{i}] must be on {w.device}, found {t.device}")
    return None


def scatter_weights_(
    weights: list[Tensor], indices: list[Tensor], base: list[Tensor], delta: list[Tensor] | None,
    scale: float = 1.0,
) -> None:
    """`W.flat[idx] = base + scale * delta` (or `base`) for every layer, in place. Eagerly this
    calls the kernels directly (the dispatcher's cost over many layers' tensors is
    noticeable); under torch.compile it is the registered mutating op, so Inductor sees the
    mutation."""
    if torch.compiler.is_compiling():
        torch.ops.shira_fx.scatter_(weights, indices, base, delta or [], scale)
    else:
        kernels.scatter_layers_(weights, indices, base, delta or None, scale)
