"""Mixed batches on the side path: segments of rows, each with its own adapter (or none),
the adapters packed with per-adapter offsets, so which adapter a segment uses is data, never
a shape. The Triton kernel of `side` on CUDA (never synchronising), `torch.sparse.mm` per
adapter on the CPU; and `mixed_linear_cpu`, a mixed batch's whole linear on the CPU.
"""

from __future__ import annotations

import functools
from itertools import pairwise

import torch
from torch import Tensor

from .dense import dense_linear
from .side import (
    _INTS,
    _check_common,
    _csr,
    _path,
    _spmm_triton,
    _untranspose,
    dense_is_cheaper,
    side_backward_x,
    side_backward_x_reference,
    side_forward,
    side_forward_reference,
)
from .side_cpu import spmm_cpu


def _check_segments(name: str, x: Tensor, seg_starts: Tensor, seg_adapters: Tensor,
                    adapter_offsets: Tensor) -> None:
    for label, t in (("seg_starts", seg_starts), ("seg_adapters", seg_adapters),
                     ("adapter_offsets", adapter_offsets)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in _INTS:
            found = f"shape {tuple(t.shape)} dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: {label} must be 1-D int32 or int64, found {found}")
        if t.device != x.device:
            raise ValueError(f"{name}: {label} must be on {x.device} (the input's device), found {t.device}")
    if seg_starts.shape[0] != seg_adapters.shape[0] + 1:
        raise ValueError(
            f"{name}: seg_starts must have one more entry than seg_adapters "
            f"({seg_adapters.shape[0] + 1}), found {seg_starts.shape[0]}"
        )
    if adapter_offsets.shape[0] < 1:
        raise ValueError(f"{name}: adapter_offsets must hold at least one entry (0), found none")


def _first_drop(xs: list[int]) -> int | None:
    """The first position whose entry is below the one before it, or None."""
    return next((i + 1 for i, (u, v) in enumerate(pairwise(xs)) if v < u), None)


def _check_segment_values(
    name: str, T: int, seg_starts: Tensor, seg_adapters: Tensor, adapter_offsets: Tensor,
    nnz: int,
) -> list[tuple[int, int, int]]:
    """The CPU path reads the segment table on the host anyway, so it checks its values too;
    returns the (start, end, adapter) segments."""
    starts, ids, offs = seg_starts.tolist(), seg_adapters.tolist(), adapter_offsets.tolist()
    drop = _first_drop(starts)
    if drop is not None:
        raise ValueError(f"{name}: seg_starts must be non-decreasing, found seg_starts[{drop}] = "
                         f"{starts[drop]} after {starts[drop - 1]}")
    if starts[0] < 0 or starts[-1] > T:
        raise ValueError(f"{name}: seg_starts must lie within [0, {T}] (T = x.shape[0]), "
                         f"found {starts[0]} .. {starts[-1]}")
    n_adapters = len(offs) - 1
    bad = next((i for i, a in enumerate(ids) if not -1 <= a < n_adapters), None)
    if bad is not None:
        raise ValueError(f"{name}: seg_adapters must be -1 (base) or an adapter id in [0, {n_adapters}),"
                         f" found seg_adapters[{bad}] = {ids[bad]}")
    drop = _first_drop(offs)
    if offs[0] != 0 or offs[-1] != nnz or drop is not None:
        found = (f"adapter_offsets[{drop}] = {offs[drop]} after {offs[drop - 1]}" if drop is not None
                 else f"{offs[0]} .. {offs[-1]}")
        raise ValueError(f"{name}: adapter_offsets must rise from 0 to {nnz} (the number of "
                         f"indices), found {found}")
    return [(starts[i], starts[i + 1], a) for i, a in enumerate(ids)]


# --------------------------------------------------------------------------------------------
# mixed batches: segments of rows, one adapter (or none) each


@torch.no_grad()
def _segmented(name: str, src: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor,
               values: Tensor, adapter_offsets: Tensor, out_features: int, in_features: int,
               transpose: bool, path: str) -> Tensor:
    _, dst_features = _check_common(name, src, indices, values, out_features, in_features,
                                    transpose, path, two_d=True)
    _check_segments(name, src, seg_starts, seg_adapters, adapter_offsets)
    T = src.shape[0]
    if path == "cpu":
        segments = _check_segment_values(name, T, seg_starts, seg_adapters, adapter_offsets,
                                         indices.shape[0])
        crow, col, val = _csr(indices, values, adapter_offsets, out_features, in_features, transpose)
        return spmm_cpu(src, crow, col, val, dst_features, segments, src.dtype)
    crow, col, val = _csr(indices, values, adapter_offsets, out_features, in_features, transpose)
    n_segments, n_adapters = seg_adapters.shape[0], adapter_offsets.shape[0] - 1
    # an adapter id out of range cannot be reported without reading it back from the GPU:
    # those segments' rows come out NaN rather than silently wrong
    bad = (seg_adapters < -1) | (seg_adapters >= n_adapters)
    ids = torch.where(bad, -1, seg_adapters)
    out = _untranspose(_spmm_triton(src, crow, col, val, dst_features, seg_starts, ids), src.dtype)
    if T and n_segments:
        row_seg = torch.searchsorted(seg_starts.to(torch.int64),
                                     torch.arange(T, device=src.device), right=True) - 1
        inside = (row_seg >= 0) & (row_seg < n_segments)
        row_bad = inside & bad[row_seg.clamp(0, n_segments - 1)]
        out.masked_fill_(row_bad[:, None], float("nan"))
    return out


_SEGMENT_DOC = """

    Rows [seg_starts[i], seg_starts[i+1]) of the (T, {src}) input form segment i, which uses
    adapter seg_adapters[i] (-1: none, those rows come out zero, as do rows outside every
    segment). Adapter a is indices[adapter_offsets[a]:adapter_offsets[a+1]] (sorted flat
    offsets into its (out, in) delta) with the values there. Empty segments are allowed, so a
    caller can pad the segment table to a fixed length. The CPU path checks the table's values
    (ValueError); the Triton path never synchronises, and its segments with an unknown adapter
    come out NaN.
"""


def side_forward_segmented(
    x: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor, values: Tensor,
    adapter_offsets: Tensor, out_features: int, in_features: int, path: str | None = None,
) -> Tensor:
    """`x[rows] @ S_a.T` per segment of rows, a mixed batch's side path: (T, in) -> (T, out)
    in x's dtype. The Triton kernel on CUDA, `torch.sparse.mm` per adapter on CPU (`path`:
    "triton" or "cpu" forces one)."""
    name = "side_forward_segmented" + (f"_{path}" if path else "")
    return _segmented(name, x, seg_starts, seg_adapters, indices, values,
                      adapter_offsets, out_features, in_features, False, path or _path(x))


def side_backward_x_segmented(
    grad_y: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor, values: Tensor,
    adapter_offsets: Tensor, out_features: int, in_features: int, path: str | None = None,
) -> Tensor:
    """`grad_y[rows] @ S_a` per segment, the input gradient of `side_forward_segmented`:
    (T, out) -> (T, in) in grad_y's dtype (`path` as there)."""
    name = "side_backward_x_segmented" + (f"_{path}" if path else "")
    return _segmented(name, grad_y, seg_starts, seg_adapters, indices, values,
                      adapter_offsets, out_features, in_features, True, path or _path(grad_y))


# one path each, for tests and benches
side_forward_segmented_triton = functools.partial(side_forward_segmented, path="triton")
side_forward_segmented_cpu = functools.partial(side_forward_segmented, path="cpu")
side_backward_x_segmented_triton = functools.partial(side_backward_x_segmented, path="triton")
side_backward_x_segmented_cpu = functools.partial(side_backward_x_segmented, path="cpu")


for _fn, _src in ((side_forward_segmented, "in"), (side_backward_x_segmented, "out")):
    if _fn.__doc__:  # None under python -OO
        _fn.__doc__ += _SEGMENT_DOC.format(src=_src)


def pack_adapters(adapters: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """(indices, values, adapter_offsets) for the segmented functions from per-adapter
    (indices, values) pairs: the concatenations and the int64 offsets [0, n0, n0 + n1, ...]."""
    if not adapters:
        raise ValueError("pack_adapters: expected at least one (indices, values) pair, found none")
    for i, (idx, val) in enumerate(adapters):
        if idx.dim() != 1 or val.shape != idx.shape:
            raise ValueError(
                f"pack_adapters: adapter {i} must have 1-D indices and values of one shape, "
                f"found {tuple(idx.shape)} and {tuple(val.shape)}"
            )
    counts = torch.tensor([0] + [idx.shape[0] for idx, _ in adapters], dtype=torch.int64)
    indices = torch.cat([idx for idx, _ in adapters])
    values = torch.cat([val for _, val in adapters])
    return indices, values, torch.cumsum(counts, 0).to(indices.device)


def _segmented_reference(fn, src: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor,
                         values: Tensor, adapter_offsets: Tensor, out_features: int, in_features: int,
                         dst_features: int) -> Tensor:
    out = torch.zeros(src.shape[0], dst_features, dtype=src.dtype, device=src.device)
    offs = adapter_offsets.tolist()
    starts = seg_starts.tolist()
    for i, a in enumerate(seg_adapters.tolist()):
        if a < 0 or starts[i + 1] <= starts[i]:
            continue
        lo, hi = offs[a], offs[a + 1]
        out[starts[i] : starts[i + 1]] = fn(src[starts[i] : starts[i + 1]], indices[lo:hi],
                                            values[lo:hi], out_features, in_features)
    return out


def side_forward_segmented_reference(
    x: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor, values: Tensor,
    adapter_offsets: Tensor, out_features: int, in_features: int,
) -> Tensor:
    """`side_forward_segmented` as one `side_forward_reference` per segment (the test oracle)."""
    return _segmented_reference(side_forward_reference, x, seg_starts, seg_adapters, indices, values,
                                adapter_offsets, out_features, in_features, out_features)


def side_backward_x_segmented_reference(
    grad_y: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor, values: Tensor,
    adapter_offsets: Tensor, out_features: int, in_features: int,
) -> Tensor:
    """`side_backward_x_segmented` as one `side_backward_x_reference` per segment (the oracle)."""
    return _segmented_reference(side_backward_x_reference, grad_y, seg_starts, seg_adapters, indices,
                                values, adapter_offsets, out_features, in_features, in_features)



def mixed_linear_cpu(x: Tensor, weight: Tensor, bias: Tensor | None, row_adapters: Tensor, indices: Tensor,
                     values: Tensor, offsets: Tensor, transposed: bool) -> Tensor:
    """A mixed batch's whole linear on the CPU (the `shira_fx::request_linear` op): batch row b
    (x's first dimension) computes with `weight` plus adapter `row_adapters[b]`'s correction
    (-1: none), correction a being `indices/values[offsets[a]:offsets[a+1]]` (flat offsets into
    the weight as stored). The rows of one adapter run together, either on a copy of the weight
    with the correction added (when their tokens times its nnz outweigh copying the weight) or
    on the weight plus the sparse side product: a mixed batch costs about the base model's
    linear."""
    out_features = weight.shape[1] if transposed else weight.shape[0]
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    y = x3.new_empty(*x3.shape[:2], out_features)
    bounds = offsets.tolist()
    groups: dict[int, list[int]] = {}
    for b, a in enumerate(row_adapters.tolist()):
        if not -1 <= a < len(bounds) - 1:
            raise ValueError(f"request_linear: row {b} names adapter {a}; the table holds {len(bounds) - 1}")
        groups.setdefault(a, []).append(b)
    for a, rows in groups.items():
        sel = torch.tensor(rows, device=x.device)
        xs = x3 if len(rows) == x3.shape[0] else x3.index_select(0, sel)
        lo, hi = (bounds[a], bounds[a + 1]) if a >= 0 else (0, 0)
        idx, val = indices[lo:hi], values[lo:hi]
        if dense_is_cheaper(xs.shape[0] * xs.shape[1], hi - lo, weight.numel()):
            w = weight.clone()
            w.view(-1).index_add_(0, idx.long(), val.to(w.dtype))
            ys = dense_linear(xs, w, bias, transposed)
        else:
            ys = dense_linear(xs, weight, bias, transposed)
            if hi > lo:
                side = (side_backward_x(xs, idx, val, weight.shape[0], weight.shape[1]) if transposed
                        else side_forward(xs, idx, val, weight.shape[0], weight.shape[1]))
                ys = ys + side.to(ys.dtype)
        if len(rows) == x3.shape[0]:
            y = ys
        else:
            y.index_copy_(0, sel, ys.to(y.dtype))
    return y.reshape(*x.shape[:-1], out_features)


def segmented_side_product(x: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor,
                           values: Tensor, offsets: Tensor, out_features: int, in_features: int,
                           transposed: bool) -> Tensor:
    """A mixed batch's side path (the `shira_fx::side_segmented` op): rows `[seg_starts[i],
    seg_starts[i+1])` of the 2-D `x` get `x @ S_a.T` with adapter a = `seg_adapters[i]`;
    `transposed`: a weight stored (in, out), whose S is applied as `x @ S`."""
    if transposed:  # S stored (in, out): x @ S (the side backward's product, roles swapped)
        return side_backward_x_segmented(x, seg_starts, seg_adapters, indices, values, offsets,
                                         in_features, out_features)
    return side_forward_segmented(x, seg_starts, seg_adapters, indices, values, offsets,
                                  out_features, in_features)
