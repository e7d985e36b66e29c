"""What a bank holds of one adapter for one layer (`Slot`), and the one way several adapters'
deltas add up at a layer (`fuse`), shared by activation and mixed batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Slot:
    """One adapter's data for one layer: int64 indices, true base values (weight dtype) and
    the fp32 delta."""

    indices: Tensor
    base: Tensor
    delta: Tensor


def fuse(parts: list[tuple[Tensor, Tensor, float]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Σ weight · delta over (indices, delta, weight) parts, added in the order given (the
    adapters' name order: the order a dense reference adds them). Returns the sorted unique
    int64 positions, the fp32 sum there, and for each element of the concatenated parts its
    place among the positions (to gather anything else stored per part, like base values)."""
    if not parts:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, torch.empty(0, device=device), empty
    idx, inverse = torch.unique(torch.cat([i.to(device).long() for i, _, _ in parts]), return_inverse=True)
    total = torch.zeros(idx.numel(), dtype=torch.float32, device=device)
    total.index_add_(0, inverse, torch.cat([d.to(device).float() * w for _, d, w in parts]))
    return idx, total, inverse
