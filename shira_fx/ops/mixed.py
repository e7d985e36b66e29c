"""Mixed batches (inference): each row of a batch with its own adapter (`request_linear`,
`side_segmented`)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from .checks import INTS, check, check_float, check_linear, check_sparse

# -- mixed batches (inference) -------------------------------------------------------------------


def _check_table(op: str, indices: Tensor, values: Tensor, offsets: Tensor, like: Tensor) -> None:
    check_sparse(op, indices, values, like)
    check(offsets.dim() == 1 and offsets.dtype in INTS and offsets.shape[0] >= 1, op,
          f"offsets must be 1-D int32/int64 with at least one entry, found {offsets.dtype} "
          f"of shape {tuple(offsets.shape)}")


@torch.library.custom_op("shira_fx::request_linear", mutates_args=())
def request_linear(x: Tensor, weight: Tensor, bias: Tensor | None, row_adapters: Tensor, indices: Tensor,
                   values: Tensor, offsets: Tensor, transposed: bool) -> Tensor:
    """A mixed batch's whole linear on the CPU, for inference: batch row b (x's first
    dimension) computes with `weight` plus adapter `row_adapters[b]`'s correction (-1: none),
    correction a being `indices/values[offsets[a]:offsets[a+1]]` (`kernels.mixed_linear_cpu`)."""
    return kernels.mixed_linear_cpu(x, weight, bias, row_adapters, indices, values, offsets, transposed)


@request_linear.register_fake
def _(x, weight, bias, row_adapters, indices, values, offsets, transposed):
    op = "request_linear"
    out_features = check_linear(op, x, weight, bias, transposed)
    check(x.dim() >= 2, op, f"x must be (batch, ..., in), found shape {tuple(x.shape)}")
    check(row_adapters.dim() == 1 and row_adapters.dtype in INTS and row_adapters.shape[0] == x.shape[0],
          op, f"row_adapters must be 1-D ints, one per batch row ({x.shape[0]}), found "
          f"{row_adapters.dtype} of shape {tuple(row_adapters.shape)}")
    _check_table(op, indices, values, offsets, x)
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("shira_fx::side_segmented", mutates_args=())
def side_segmented(x: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor, values: Tensor,
                   offsets: Tensor, out_features: int, in_features: int, transposed: bool) -> Tensor:
    """A mixed batch's side path, for inference: rows `[seg_starts[i], seg_starts[i+1])` of the
    2-D `x` get `x @ S_a.T` with adapter a = `seg_adapters[i]` (-1: none), adapter a's delta
    being `indices/values[offsets[a]:offsets[a+1]]`. Which adapter each row uses is data, not
    shape: a new list of requests compiles nothing. `transposed`: a weight stored (in, out)."""
    return kernels.segmented_side_product(x, seg_starts, seg_adapters, indices, values, offsets,
                                          out_features, in_features, transposed)


@side_segmented.register_fake
def _(x, seg_starts, seg_adapters, indices, values, offsets, out_features, in_features, transposed):
    op = "side_segmented"
    check(x.dim() == 2 and x.shape[1] == in_features, op,
          f"x must be (T, in_features = {in_features}), found shape {tuple(x.shape)}")
    check_float(op, "x", x)
    for name, t in (("seg_starts", seg_starts), ("seg_adapters", seg_adapters)):
        check(t.dim() == 1 and t.dtype in INTS, op, f"{name} must be 1-D int32/int64")
    check(seg_starts.shape[0] == seg_adapters.shape[0] + 1, op,
          f"seg_starts must have one more entry than seg_adapters ({seg_adapters.shape[0] + 1}), "
          f"found {seg_starts.shape[0]}")
    _check_table(op, indices, values, offsets, x)
    return x.new_empty(x.shape[0], out_features)
