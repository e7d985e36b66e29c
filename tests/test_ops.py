"""The custom ops' CPU paths: the threaded scatter equals the reference bit for bit, and the
registered ops agree with their eager implementations."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shira_fx import ops
from shira_fx.kernels import scatter, side
from shira_fx.kernels.scatter import scatter_fused_reference_
from shira_fx.kernels.sddmm import sddmm_reference
from tests.conftest import budget


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=40), st.integers(1, 4))
def test_balanced_groups_cover_every_layer_once(sizes, n):
    groups = scatter._balanced_groups(sizes, n)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert len(groups) <= n


def _layers(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    shapes = [(300, 200), (64, 64), (512, 128), (7, 900), (256, 256)]
    weights, indices, base, delta = [], [], [], []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, generator=g).to(dtype)
        idx = torch.randperm(w.numel(), generator=g)[: w.numel() // 3].sort().values
        weights.append(w)
        indices.append(idx)
        base.append(torch.randn(idx.numel(), generator=g).to(dtype))
        delta.append(torch.randn(idx.numel(), generator=g))
    return weights, indices, base, delta


@pytest.mark.fuzz
@settings(max_examples=budget(10, 5), deadline=None)
@given(seed=st.integers(0, 100), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       restore=st.booleans(), scale=st.sampled_from([1.0, 0.7, -2.0]))
def test_threaded_scatter_equals_reference_bit_exactly(seed, dtype, restore, scale):
    torch.set_num_threads(2)
    w1, idx, base, delta = _layers(seed, dtype)
    assert sum(i.numel() for i in idx) > 65536  # large enough for the threaded path
    w2 = [w.clone() for w in w1]
    d = None if restore else delta
    ops.scatter_weights_(w1, idx, base, d, scale)
    scatter_fused_reference_(w2, idx, base, d, scale)
    for a, b in zip(w1, w2, strict=True):
        assert torch.equal(a, b)


def test_registered_scatter_op_mutates_in_place_like_the_eager_call():
    w1, idx, base, delta = _layers(0, torch.float32)
    w2 = [w.clone() for w in w1]
    ptrs = [w.data_ptr() for w in w1]
    torch.ops.shira_fx.scatter_(w1, idx, base, delta, 0.5)
    ops.scatter_weights_(w2, idx, base, delta, 0.5)
    assert [w.data_ptr() for w in w1] == ptrs
    for a, b in zip(w1, w2, strict=True):
        assert torch.equal(a, b)


@pytest.mark.fuzz
@settings(max_examples=budget(15, 5), deadline=None)
@given(t=st.integers(1, 40), a=st.integers(1, 30), b=st.integers(1, 30), seed=st.integers(0, 99),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_masked_grad_op_matches_the_reference(t, a, b, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(t, a, generator=g).to(dtype), torch.randn(t, b, generator=g).to(dtype)
    idx = torch.randperm(a * b, generator=g)[: max(1, a * b // 4)].sort().values.int()
    got = torch.ops.shira_fx.masked_grad(x, y, idx, b, [])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sddmm_reference(x, y, idx, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("copy_at", [0.0, float("inf")], ids=["dense-delta", "sparse-kernel"])
def test_side_linear_either_cpu_path_equals_the_dense_delta(copy_at, monkeypatch):
    """The side path beside a quantized weight, both ways the CPU runs it (a GEMM on S written
    out, or the sparse kernel): output, input gradient and values' gradient against x @ S.T."""
    monkeypatch.setattr(side, "DENSE_COPY_TOKENS_X_NNZ", copy_at)
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 6, 8
    indices = torch.randperm(out_f * in_f, generator=g)[:13].sort().values.int()
    values = torch.randn(13, generator=g, requires_grad=True)
    x = torch.randn(5, 3, in_f, generator=g, requires_grad=True)
    w = torch.randn(5, 3, out_f, generator=g)
    y = ops.side_linear(x, values, indices, out_f, in_f)
    (y * w).sum().backward()
    dense = torch.zeros(out_f * in_f).index_put((indices.long(),), values.detach()).view(out_f, in_f)
    dense.requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = x2 @ dense.T
    (y_ref * w).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values.grad, dense.grad.view(-1)[indices.long()], rtol=1e-5, atol=1e-6)
