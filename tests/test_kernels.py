"""Triton kernels against their torch references; on CPU they run under TRITON_INTERPRET=1."""

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shira_fx.kernels import (
    scatter,
    scatter_fused_,
    scatter_fused_reference_,
    sddmm,
    sddmm_cpu,
    sddmm_reference,
)
from tests.conftest import budget

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
INDEX_DTYPES = st.sampled_from([torch.int32, torch.int64])
RTOL = 1e-5


def _random_indices(n: int, density: float, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    k = min(n, math.ceil(density * n))
    return torch.randperm(n, generator=g)[:k].sort().values.to(dtype)


def _assert_close_to_oracle(out, expected, a, b, idx, ncols) -> None:
    # fp32 accumulation error scales with sum_t |a||b|, not with the (possibly cancelling) result
    magnitude = sddmm_reference(a.abs(), b.abs(), idx, ncols)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    err = (out - expected).abs()
    assert torch.all(err <= RTOL * magnitude + 1e-30), err.max()


@st.composite
def sddmm_cases(draw, max_t: int = 70, max_side: int = 48):
    t = draw(st.integers(1, max_t))
    rows, cols = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    dtype = draw(st.sampled_from(FLOATS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    a = torch.randn(t, rows, generator=g).to(dtype)
    b = torch.randn(t, cols, generator=g).to(dtype)
    if draw(st.booleans()):
        a = a.t().contiguous().t()  # column-major, as a transposed activation arrives
    density = draw(st.sampled_from([0.02, 0.1, 0.5, 1.0]))
    idx = _random_indices(rows * cols, density, draw(INDEX_DTYPES), g)
    return a, b, idx, cols


@pytest.mark.fuzz
@settings(max_examples=budget(60, 10), deadline=None)
@given(sddmm_cases())
def test_sddmm_kernel_matches_reference_over_shapes_dtypes_and_densities(case):
    a, b, idx, ncols = case
    out = sddmm(a.to(DEVICE), b.to(DEVICE), idx.to(DEVICE), ncols).cpu()
    _assert_close_to_oracle(out, sddmm_reference(a, b, idx, ncols), a, b, idx, ncols)


@pytest.mark.fuzz
@settings(max_examples=budget(60, 10), deadline=None)
@given(sddmm_cases(max_t=200, max_side=64))
def test_sddmm_cpu_matches_reference_and_dense_product(case):
    a, b, idx, ncols = case
    out = sddmm_cpu(a, b, idx, ncols)
    dense = (a.float().T @ b.float()).view(-1)[idx.long()]
    _assert_close_to_oracle(out, sddmm_reference(a, b, idx, ncols), a, b, idx, ncols)
    _assert_close_to_oracle(out, dense, a, b, idx, ncols)


def test_sddmm_kernel_sums_split_t_partials_deterministically():
    # few masked elements and a long T: the launcher splits T across programs
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 9, generator=g), torch.randn(300, 7, generator=g)
    idx = _random_indices(63, 0.3, torch.int32, g)
    args = (a.to(DEVICE), b.to(DEVICE), idx.to(DEVICE), 7)
    first, second = sddmm(*args).cpu(), sddmm(*args).cpu()
    assert torch.equal(first, second)
    _assert_close_to_oracle(first, sddmm_reference(a, b, idx, 7), a, b, idx, 7)


@pytest.mark.parametrize("fn", [sddmm, sddmm_cpu])
@pytest.mark.parametrize(
    "t, rows, cols, flat",
    [
        (5, 4, 3, []),  # nnz = 0
        (0, 4, 3, [0, 5, 11]),  # T = 0: an empty sum
        (1, 4, 3, [0, 5, 11]),
        (7, 1, 1, [0]),  # one element, a 1x1 matrix
        (66, 6, 5, [29]),  # the last element of the matrix
    ],
)
def test_sddmm_edge_cases_match_dense_product(fn, t, rows, cols, flat):
    device = DEVICE if fn is sddmm else "cpu"
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(t, rows, generator=g), torch.randn(t, cols, generator=g)
    idx = torch.tensor(flat, dtype=torch.int64)
    out = fn(a.to(device), b.to(device), idx.to(device), cols).cpu()
    _assert_close_to_oracle(out, (a.T @ b).view(-1)[idx], a, b, idx, cols)


@pytest.mark.parametrize("fn", [sddmm, sddmm_cpu])
def test_sddmm_rejects_bad_shapes_naming_expected_and_found(fn):
    a, b = torch.randn(4, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"same T, found a \(4, 3\) and b \(5, 2\)"):
        fn(a, b, torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="ncols must equal b.shape"):
        fn(a, b[:4], torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="int32 or int64 indices"):
        fn(a, b[:4], torch.tensor([0.0]), 2)


def _interpreter_bf16(x: torch.Tensor) -> torch.Tensor:
    # triton 3.9's interpreter casts fp32 to bf16 by truncation, the GPU rounds to nearest even
    return (x.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _expected_after_scatter(weights, indices, base, delta, scale):
    expected = [w.clone() for w in weights]
    scatter_fused_reference_(expected, indices, base, delta, scale)
    if INTERPRETED and delta is not None:
        for w, idx, b, d in zip(expected, indices, base, delta, strict=True):
            if w.dtype == torch.bfloat16:
                w.view(-1)[idx.long()] = _interpreter_bf16(b.float() + d.float() * scale)
    return expected


@st.composite
def scatter_cases(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    weights, indices, base, delta = [], [], [], []
    for _ in range(draw(st.integers(1, 4))):
        w_dtype = draw(st.sampled_from(FLOATS))
        w = torch.randn(draw(st.integers(1, 40)), draw(st.integers(1, 40)), generator=g).to(w_dtype)
        density = draw(st.sampled_from([0.02, 0.1, 0.5, 1.0]))
        idx = _random_indices(w.numel(), density, draw(INDEX_DTYPES), g)
        weights.append(w)
        indices.append(idx)
        # base differs from the weight's current values, so restoring is visible
        base.append(torch.randn(idx.shape[0], generator=g).to(w_dtype))
        d_dtype = draw(st.sampled_from([torch.float32, w_dtype]))
        delta.append(torch.randn(idx.shape[0], generator=g).to(d_dtype))
    scale = draw(st.sampled_from([1.0, 0.7, -2.5, 0.0]))
    return weights, indices, base, (None if draw(st.booleans()) else delta), scale


def _on_device(tensors):
    # always a copy, so the inputs stay as they were for the comparisons
    return None if tensors is None else [t.to(DEVICE, copy=True) for t in tensors]


@pytest.mark.fuzz
@settings(max_examples=budget(100, 10), deadline=None)
@given(scatter_cases())
def test_scatter_kernel_matches_reference_bit_exactly_and_touches_only_indices(case):
    weights, indices, base, delta, scale = case
    expected = _expected_after_scatter(weights, indices, base, delta, scale)
    out = _on_device(weights)
    scatter_fused_(out, _on_device(indices), _on_device(base), _on_device(delta), scale)
    for w, before, want, idx in zip(out, weights, expected, indices, strict=True):
        w = w.cpu()
        assert torch.equal(w, want)
        untouched = torch.ones(w.numel(), dtype=torch.bool)
        untouched[idx.long()] = False
        assert torch.equal(w.view(-1)[untouched], before.view(-1)[untouched])


@pytest.mark.fuzz
@settings(max_examples=budget(50, 10), deadline=None)
@given(scatter_cases())
def test_restore_after_activate_is_bit_exact(case):
    weights, indices, _, delta, scale = case
    original = _on_device(weights)
    out = _on_device(weights)
    indices = _on_device(indices)
    saved = [w.view(-1)[idx.long()].clone() for w, idx in zip(out, indices, strict=True)]
    if delta is not None:
        scatter_fused_(out, indices, saved, _on_device(delta), scale)
    scatter_fused_(out, indices, saved)
    assert all(torch.equal(w, o) for w, o in zip(out, original, strict=True))


def test_scatter_edge_cases_empty_single_and_last_element():
    weights = [torch.zeros(3, 4), torch.zeros(2, 2), torch.zeros(5, 1)]
    indices = [torch.tensor([], dtype=torch.int64), torch.tensor([3]), torch.tensor([0, 4])]
    base = [torch.tensor([]), torch.tensor([1.5]), torch.tensor([2.0, 3.0])]
    delta = [torch.tensor([]), torch.tensor([0.25]), torch.tensor([1.0, -1.0])]
    out = _on_device(weights)
    scatter_fused_(out, _on_device(indices), _on_device(base), _on_device(delta), 2.0)
    assert torch.equal(out[0].cpu(), torch.zeros(3, 4))
    assert torch.equal(out[1].cpu(), torch.tensor([[0.0, 0.0], [0.0, 2.0]]))
    assert torch.equal(out[2].cpu(), torch.tensor([[4.0], [0.0], [0.0], [0.0], [1.0]]))
    scatter_fused_([], [], [])


def test_scatter_covers_layers_spanning_many_programs():
    # 3500 and 2049 elements: several 1024-element programs per layer, ragged last ones
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(shape, generator=g) for shape in [(70, 50), (3, 3), (1, 2049)]]
    indices = [torch.arange(w.numel()) for w in weights]
    base = [torch.randn(len(i), generator=g) for i in indices]
    delta = [torch.randn(len(i), generator=g) for i in indices]
    expected = _expected_after_scatter(weights, indices, base, delta, 0.5)
    out = _on_device(weights)
    scatter_fused_(out, _on_device(indices), _on_device(base), _on_device(delta), 0.5)
    assert all(torch.equal(w.cpu(), e) for w, e in zip(out, expected, strict=True))


def test_scatter_launches_once_per_dtype_group(monkeypatch):
    launches = []
    kernel = scatter._scatter_kernel

    class CountingKernel:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(scatter, "_scatter_kernel", CountingKernel())
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.float32]
    weights = [torch.zeros(8, 8 + i, dtype=dt, device=DEVICE) for i, dt in enumerate(dtypes)]
    indices = [torch.arange(0, w.numel(), 3, device=DEVICE) for w in weights]
    base = [torch.ones_like(i, dtype=w.dtype) for i, w in zip(indices, weights, strict=True)]
    scatter_fused_(weights, indices, base)
    assert len(launches) == 2
    for w, i, b in zip(weights, indices, base, strict=True):
        assert torch.equal(w.view(-1)[i], b)


@pytest.mark.parametrize("fn", [scatter_fused_, scatter_fused_reference_])
def test_scatter_rejects_bad_layers_naming_position_and_shapes(fn):
    w, idx, base = torch.zeros(4, 4), torch.tensor([1, 2]), torch.zeros(2)
    with pytest.raises(ValueError, match="found 2 weights, 1 indices, 2 base"):
        fn([w, w], [idx], [base, base])
    with pytest.raises(ValueError, match=r"base\[1\] must have shape \(2,\) on cpu, found \(3,\)"):
        fn([w, w], [idx, idx], [base, torch.zeros(3)])
    with pytest.raises(ValueError, match=r"weights\[0\] must be a contiguous"):
        fn([w.t()], [idx], [base])
    with pytest.raises(ValueError, match=r"delta\[0\] must have shape \(2,\)"):
        fn([w], [idx], [base], [torch.zeros(5)])
    with pytest.raises(ValueError, match=r"base\[0\] must have dtype torch.float32"):
        fn([w], [idx], [base.half()])
