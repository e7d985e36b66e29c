"""The sparse side product on the CPU: a CSR matrix times slices of the transposed input by
`torch.sparse.mm`, each slice sized for a core's L2 cache (each nonzero reads one row of
it); bf16/fp16 inputs are multiplied in fp32 and rounded once. `side` and `side_segmented`
call it for one adapter or for segments of rows with their own adapters.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch import Tensor

# the CPU path multiplies S by slices of the transposed input whose bytes fit in a core's L2
# cache, since each nonzero reads one row of that slice; an input this small is one slice
_CPU_SLICE_BYTES = 1 << 18
_CPU_WHOLE_BYTES = 1 << 20
_CPU_MIN_SLICE = 16


def _cpu_slice(n_cols: int, T: int) -> int:
    """Tokens per slice: a power of two whose fp32 (n_cols, slice) block fits the budget."""
    if 4 * n_cols * T <= _CPU_WHOLE_BYTES:
        return max(1, T)
    rows = _CPU_SLICE_BYTES // (4 * max(1, n_cols))
    return min(max(1, T), max(_CPU_MIN_SLICE, 1 << max(0, rows.bit_length() - 1)))


def _spmm_cpu_into(out: Tensor, src: Tensor, crow: Tensor, col: Tensor, val: Tensor,
                   n_rows: int) -> None:
    """out (T, n_rows) = src (T, n_cols) @ M.T for one CSR matrix M, by `torch.sparse.mm` on
    slices of tokens; bf16/fp16 inputs are multiplied in fp32 and rounded once at the end.

    Each slice is transposed into one reused (n_cols, slice) buffer and multiplied into
    another with beta = 0, so no slice allocates or zero-fills."""
    n_cols = src.shape[1]
    step = _cpu_slice(n_cols, src.shape[0])
    part = torch.empty(n_cols, step, dtype=torch.float32)
    prod = torch.empty(n_rows, step, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        m = torch.sparse_csr_tensor(
            crow, col, val.to(torch.float32), (n_rows, n_cols), check_invariants=False
        )
        for t in range(0, src.shape[0], step):
            n = min(step, src.shape[0] - t)
            if n < step:  # the last, shorter slice: fresh contiguous buffers
                part, prod = part[:, :n].contiguous(), prod[:, :n].contiguous()
            # one pass: transposed to (n_cols, n) row-major and cast to fp32
            part.copy_(src[t : t + n].t())
            torch.addmm(prod, m, part, beta=0.0, out=prod)
            out[t : t + n] = prod.t()


def spmm_cpu(
    src: Tensor, crow: Tensor, col: Tensor, val: Tensor, n_rows: int,
    segments: list[tuple[int, int, int]], dtype: torch.dtype,
) -> Tensor:
    """(T, n_rows) in `dtype`: each (start, end, adapter) segment's rows times its adapter's
    CSR matrix, other rows zero; segments in order and disjoint. Segments of one adapter are
    multiplied together."""
    T = src.shape[0]
    out = torch.empty(T, n_rows, dtype=dtype)
    by_adapter: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for start, end, a in segments:
        if a >= 0 and end > start:
            by_adapter[a].append((start, end))
    bounds = crow[:, [0, -1]].tolist() if by_adapter else []
    computed: list[tuple[int, int]] = []
    for a, spans in by_adapter.items():
        lo, hi = bounds[a]
        if hi == lo:  # an empty index set: its rows stay zero
            continue
        a_crow = crow[a] - lo
        a_col, a_val = col[lo:hi], val[lo:hi]
        computed += spans
        if len(spans) == 1:
            start, end = spans[0]
            _spmm_cpu_into(out[start:end], src[start:end], a_crow, a_col, a_val, n_rows)
            continue
        rows = torch.cat([src[s:e] for s, e in spans])
        part = torch.empty(rows.shape[0], n_rows, dtype=dtype)
        _spmm_cpu_into(part, rows, a_crow, a_col, a_val, n_rows)
        pos = 0
        for s, e in spans:
            out[s:e] = part[pos : pos + e - s]
            pos += e - s
    # zero only the rows no product wrote
    pos = 0
    for start, end in sorted(computed):
        if start > pos:
            out[pos:start].zero_()
        pos = max(pos, end)
    if pos < T:
        out[pos:].zero_()
    return out

