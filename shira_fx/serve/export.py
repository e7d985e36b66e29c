"""Quantized deployment: `export_dense` turns every quantized linear into a plain dense one
holding its dequantized weight with the adapter riding beside it fused in."""

from __future__ import annotations

import torch
from torch import nn

from ..layer import beside_weight
from ..quantized import dequantized_weight, logical_shape, quantized_kind


@torch.no_grad()
def export_dense(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """For deployment: replace, in place, every quantized linear by a plain `nn.Linear` in
    `dtype` holding its dequantized weight plus the adapter riding beside it (a training
    adapter's values or the bank's active adapter), so the model runs anywhere at the base
    model's cost. Returns `model`; the quantized layers are gone afterwards."""
    swaps = []
    for name, module in model.named_modules():
        if quantized_kind(module) is None:
            continue
        weight = dequantized_weight(module).float()
        beside = beside_weight(module)
        if beside is not None:
            idx, vals = beside
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
