"""What every fake kernel of the `shira_fx::` ops checks, with `torch._check` and a message naming
the op and the operand, so a wrong call fails at trace time instead of inside generated code."""

from __future__ import annotations

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INTS = (torch.int32, torch.int64)


def check(cond: bool, op: str, message: str) -> None:
    torch._check(cond, lambda: f"shira_fx::{op}: {message}")


def check_float(op: str, name: str, t: Tensor) -> None:
    check(t.dtype in FLOATS, op, f"{name} must be a float tensor, found {t.dtype}")


def check_sparse(op: str, indices: Tensor, values: Tensor, like: Tensor) -> None:
    """1-D int indices and as many float values, on `like`'s device."""
    check(indices.dim() == 1 and indices.dtype in INTS, op,
          f"indices must be 1-D int32/int64, found {indices.dtype} of shape {tuple(indices.shape)}")
    check(values.dim() == 1, op, f"values must be 1-D, found shape {tuple(values.shape)}")
    check(values.shape[0] == indices.shape[0], op,
          f"values ({values.shape[0]}) and indices ({indices.shape[0]}) must have one entry each")
    check_float(op, "values", values)
    for name, t in (("indices", indices), ("values", values)):
        check(t.device == like.device, op, f"{name} must be on {like.device}, found {t.device}")


def check_linear(op: str, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> int:
    """A linear's operands; returns its out_features."""
    check(weight.dim() == 2, op, f"weight must be 2-D, found shape {tuple(weight.shape)}")
    in_features, out_features = weight.shape if transposed else (weight.shape[1], weight.shape[0])
    check(x.dim() >= 1 and x.shape[-1] == in_features, op,
          f"x must end in the weight's {in_features} input features, found shape {tuple(x.shape)}")
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    check(weight.device == x.device, op, f"weight must be on {x.device}, found {weight.device}")
    if bias is not None:
        check(bias.dim() == 1 and bias.shape[0] == out_features, op,
              f"bias must have shape ({out_features},), found {tuple(bias.shape)}")
    return out_features
