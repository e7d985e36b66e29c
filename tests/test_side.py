"""The sparse side path (`x @ S.T`, `grad_y @ S`, and their segmented mixed-batch forms): every
path (CPU, Triton under TRITON_INTERPRET=1 without a GPU) against the dense reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shira_fx.kernels import side_cpu
from shira_fx.kernels.side import (
    side_backward_x,
    side_backward_x_cpu,
    side_backward_x_reference,
    side_backward_x_triton,
    side_forward,
    side_forward_cpu,
    side_forward_reference,
    side_forward_triton,
)
from shira_fx.kernels.side_segmented import (
    pack_adapters,
    side_backward_x_segmented,
    side_backward_x_segmented_cpu,
    side_backward_x_segmented_reference,
    side_backward_x_segmented_triton,
    side_forward_segmented,
    side_forward_segmented_cpu,
    side_forward_segmented_reference,
    side_forward_segmented_triton,
)
from tests.conftest import budget

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
RTOL = 1e-5
# name -> (function, runs on DEVICE (Triton) or on CPU, backward: source is grad_y (T, out))
SINGLE = {
    "forward_cpu": (side_forward_cpu, "cpu", False),
    "forward_triton": (side_forward_triton, DEVICE, False),
    "backward_cpu": (side_backward_x_cpu, "cpu", True),
    "backward_triton": (side_backward_x_triton, DEVICE, True),
}
SEGMENTED = {
    "forward_cpu": (side_forward_segmented_cpu, "cpu", False),
    "forward_triton": (side_forward_segmented_triton, DEVICE, False),
    "backward_cpu": (side_backward_x_segmented_cpu, "cpu", True),
    "backward_triton": (side_backward_x_segmented_triton, DEVICE, True),
}


def _indices(n: int, k: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=g)[: min(n, k)].sort().values.to(dtype)


def _reference(backward: bool):
    return side_backward_x_reference if backward else side_forward_reference


def _assert_close(out, src, idx, vals, out_f, in_f, backward, segmented_args=None) -> None:
    """out against the fp32 dense product: fp32 accumulation error scales with sum |x||s|, and a
    bf16/fp16 result may differ from the rounded reference by one rounding of that dtype."""
    f32 = src.float()
    if segmented_args is None:
        expected = _reference(backward)(f32, idx, vals.float(), out_f, in_f)
        magnitude = _reference(backward)(f32.abs(), idx, vals.float().abs(), out_f, in_f)
    else:
        ref = (side_backward_x_segmented_reference if backward else side_forward_segmented_reference)
        expected = ref(f32, *segmented_args[:2], idx, vals.float(), segmented_args[2], out_f, in_f)
        magnitude = ref(f32.abs(), *segmented_args[:2], idx, vals.float().abs(), segmented_args[2],
                        out_f, in_f)
    assert out.dtype == src.dtype and out.shape == expected.shape
    eps = 0.0 if src.dtype == torch.float32 else torch.finfo(src.dtype).eps
    err = (out.cpu().float() - expected).abs()
    tol = RTOL * magnitude + eps * expected.abs() + 1e-30
    assert torch.all(err <= tol), (err - tol).max()


@st.composite
def single_cases(draw, max_side: int, max_t: int):
    out_f, in_f = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    n = out_f * in_f
    k = draw(st.sampled_from([0, 1, max(1, n // 20), n // 3, n]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    idx = _indices(n, k, draw(st.sampled_from([torch.int32, torch.int64])), g)
    vals = torch.randn(idx.shape[0], generator=g).to(draw(st.sampled_from([torch.float32, torch.bfloat16])))
    dtype = draw(st.sampled_from(FLOATS))
    lead = draw(st.sampled_from([(draw(st.integers(1, max_t)),), (2, draw(st.integers(1, max_t // 2)))]))
    return out_f, in_f, idx, vals, dtype, lead, g


def _check_single(name: str, case) -> None:
    fn, device, backward = SINGLE[name]
    out_f, in_f, idx, vals, dtype, lead, g = case
    src = torch.randn(*lead, out_f if backward else in_f, generator=g).to(dtype)
    out = fn(src.to(device), idx.to(device), vals.to(device), out_f, in_f)
    feats = src.shape[-1]
    _assert_close(out.reshape(-1, out.shape[-1]), src.reshape(-1, feats), idx, vals, out_f, in_f, backward)
    assert out.shape[:-1] == src.shape[:-1]


@pytest.mark.fuzz
@settings(max_examples=budget(100, 10), deadline=None)
@given(case=single_cases(max_side=48, max_t=80), name=st.sampled_from(["forward_cpu", "backward_cpu"]))
def test_cpu_paths_match_the_dense_reference(case, name):
    _check_single(name, case)


@pytest.mark.fuzz
@settings(max_examples=budget(60, 4), deadline=None)
@given(case=single_cases(max_side=12, max_t=70),
       name=st.sampled_from(["forward_triton", "backward_triton"]))
def test_triton_paths_match_the_dense_reference(case, name):
    _check_single(name, case)


@pytest.mark.parametrize("name", list(SINGLE))
@pytest.mark.parametrize(
    "out_f, in_f, t, flat, dtype",
    [
        (4, 3, 5, [], torch.float32),  # no indices: the side path adds nothing
        (4, 3, 1, [0], torch.float32),  # one element, one token
        (4, 3, 2, [11], torch.bfloat16),  # the last element of the matrix
        (3, 4, 3, list(range(12)), torch.float32),  # every element: S dense
        (3, 4, 1, list(range(12)), torch.bfloat16),  # T = 1 (decode), bf16
        (3, 4, 0, [1, 5], torch.float32),  # no tokens
        (1, 1, 2, [0], torch.float16),  # a 1x1 weight
    ],
)
def test_edge_cases_match_the_dense_product(name, out_f, in_f, t, flat, dtype):
    fn, device, backward = SINGLE[name]
    g = torch.Generator().manual_seed(1)
    src = torch.randn(t, out_f if backward else in_f, generator=g).to(dtype)
    idx = torch.tensor(flat, dtype=torch.int64)
    vals = torch.randn(len(flat), generator=g)
    out = fn(src.to(device), idx.to(device), vals.to(device), out_f, in_f)
    _assert_close(out, src, idx, vals, out_f, in_f, backward)
    dense = torch.zeros(out_f * in_f)
    dense[idx] = vals
    dense = dense.view(out_f, in_f)
    expected = src.float() @ (dense if backward else dense.t())
    assert torch.allclose(out.cpu().float(), expected, rtol=1e-2, atol=1e-5)


def test_dispatchers_pick_the_device_path_and_agree():
    g = torch.Generator().manual_seed(2)
    idx, vals = _indices(30, 9, torch.int32, g), torch.randn(9, generator=g)
    x, gy = torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g)
    assert torch.equal(side_forward(x, idx, vals, 5, 6), side_forward_cpu(x, idx, vals, 5, 6))
    assert torch.equal(side_backward_x(gy, idx, vals, 5, 6), side_backward_x_cpu(gy, idx, vals, 5, 6))


def test_cpu_path_over_several_token_slices(monkeypatch):
    # a slice budget of 64 bytes over 6 fp32 features: 16 tokens per slice, 3 slices here
    monkeypatch.setattr(side_cpu, "_CPU_SLICE_BYTES", 64)
    monkeypatch.setattr(side_cpu, "_CPU_WHOLE_BYTES", 64)
    assert side_cpu._cpu_slice(6, 40) == 16
    g = torch.Generator().manual_seed(3)
    idx, vals = _indices(30, 12, torch.int64, g), torch.randn(12, generator=g)
    x = torch.randn(40, 6, generator=g).to(torch.bfloat16)
    _assert_close(side_forward_cpu(x, idx, vals, 5, 6), x, idx, vals, 5, 6, False)
    gy = torch.randn(40, 5, generator=g)
    _assert_close(side_backward_x_cpu(gy, idx, vals, 5, 6), gy, idx, vals, 5, 6, True)


def test_flat_offsets_past_int32_on_cpu():
    # a 70000 x 40000 weight: offsets above 2**31, rows and columns near the ends
    out_f, in_f = 70_000, 40_000
    rows, cols = torch.tensor([0, 53_687, 69_999]), torch.tensor([39_999, 17, 39_998])
    idx = rows * in_f + cols
    assert idx.max() > 2**31
    vals = torch.tensor([1.5, -2.0, 0.25])
    x = torch.randn(3, in_f)
    y = side_forward_cpu(x, idx, vals, out_f, in_f)
    assert y.shape == (3, out_f)
    expected = torch.zeros(3, out_f)
    expected[:, rows] = x[:, cols] * vals
    assert torch.equal(y, expected)
    gy = torch.randn(2, out_f)
    grad = side_backward_x_cpu(gy, idx, vals, out_f, in_f)
    expected = torch.zeros(2, in_f)
    expected[:, cols] = gy[:, rows] * vals
    assert torch.equal(grad, expected)


def test_triton_backward_is_deterministic():
    g = torch.Generator().manual_seed(4)
    idx, vals = _indices(80, 40, torch.int32, g), torch.randn(40, generator=g)
    gy = torch.randn(20, 8, generator=g).to(DEVICE)
    args = (idx.to(DEVICE), vals.to(DEVICE), 8, 10)
    assert torch.equal(side_backward_x_triton(gy, *args), side_backward_x_triton(gy, *args))


# --------------------------------------------------------------------------------------------
# segmented


@st.composite
def segmented_cases(draw, max_side: int, max_t: int, max_segments: int):
    out_f, in_f = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    n = out_f * in_f
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    n_adapters = draw(st.integers(1, 4))
    adapters = [
        (_indices(n, draw(st.sampled_from([0, 1, max(1, n // 10), n // 2, n])), torch.int64, g),)
        for _ in range(n_adapters)
    ]
    adapters = [(i, torch.randn(i.shape[0], generator=g)) for (i,) in adapters]
    idx, vals, offsets = pack_adapters(adapters)
    idx = idx.to(draw(st.sampled_from([torch.int32, torch.int64])))
    lengths = draw(st.lists(st.integers(0, max_t // max_segments), min_size=1, max_size=max_segments))
    ids = draw(st.lists(st.integers(-1, n_adapters - 1), min_size=len(lengths), max_size=len(lengths)))
    head, tail = draw(st.integers(0, 3)), draw(st.integers(0, 3))  # rows outside every segment
    starts = torch.tensor([head] + lengths).cumsum(0)
    t = int(starts[-1]) + tail
    dtype = draw(st.sampled_from(FLOATS))
    return out_f, in_f, idx, vals, offsets, starts, torch.tensor(ids), t, dtype, g


def _check_segmented(name: str, case) -> None:
    fn, device, backward = SEGMENTED[name]
    out_f, in_f, idx, vals, offsets, starts, ids, t, dtype, g = case
    src = torch.randn(t, out_f if backward else in_f, generator=g).to(dtype)
    on = lambda *ts: [x.to(device) for x in ts]
    out = fn(*on(src, starts, ids, idx, vals, offsets), out_f, in_f)
    _assert_close(out, src, idx, vals, out_f, in_f, backward, (starts, ids, offsets))


@pytest.mark.fuzz
@settings(max_examples=budget(100, 10), deadline=None)
@given(case=segmented_cases(max_side=24, max_t=80, max_segments=8),
       name=st.sampled_from(["forward_cpu", "backward_cpu"]))
def test_segmented_cpu_paths_match_the_reference(case, name):
    _check_segmented(name, case)


@pytest.mark.fuzz
@settings(max_examples=budget(60, 4), deadline=None)
@given(case=segmented_cases(max_side=10, max_t=40, max_segments=6),
       name=st.sampled_from(["forward_triton", "backward_triton"]))
def test_segmented_triton_paths_match_the_reference(case, name):
    _check_segmented(name, case)


def _mixed_batch(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = 9, 7
    adapters = [(_indices(63, k, torch.int64, g), None) for k in (20, 0, 63, 5)]
    adapters = [(i, torch.randn(i.shape[0], generator=g)) for i, _ in adapters]
    idx, vals, offsets = pack_adapters(adapters)
    # segments: adapter 2, base, adapter 0, an empty segment, adapter 2 again, adapter 1 (empty
    # index set), adapter 3; row 0 and the last two rows belong to no segment
    starts = torch.tensor([1, 5, 8, 15, 15, 18, 20, 26])
    ids = torch.tensor([2, -1, 0, 3, 2, 1, 3])
    x = torch.randn(28, in_f, generator=g)
    return out_f, in_f, adapters, idx, vals, offsets, starts, ids, x


@pytest.mark.parametrize("name", ["forward_cpu", "forward_triton"])
def test_segmented_equals_each_segment_alone(name):
    fn, device, _ = SEGMENTED[name]
    single = side_forward_cpu if device == "cpu" and name.endswith("cpu") else side_forward_triton
    out_f, in_f, adapters, idx, vals, offsets, starts, ids, x = _mixed_batch()
    on = lambda *ts: [t.to(device) for t in ts]
    y = fn(*on(x, starts, ids, idx, vals, offsets), out_f, in_f).cpu()
    bounds = starts.tolist()
    covered = torch.zeros(x.shape[0], dtype=torch.bool)
    for i, a in enumerate(ids.tolist()):
        lo, hi = bounds[i], bounds[i + 1]
        covered[lo:hi] = a >= 0
        if a < 0 or hi == lo:
            continue
        alone = single(*on(x[lo:hi], *adapters[a]), out_f, in_f).cpu()
        assert torch.allclose(y[lo:hi], alone, rtol=1e-6, atol=1e-6)
    assert torch.equal(y[~covered], torch.zeros_like(y[~covered]))


def test_segmented_dispatchers_agree_with_the_cpu_paths():
    out_f, in_f, _, idx, vals, offsets, starts, ids, x = _mixed_batch()
    args = (starts, ids, idx, vals, offsets, out_f, in_f)
    assert torch.equal(side_forward_segmented(x, *args), side_forward_segmented_cpu(x, *args))
    gy = torch.randn(x.shape[0], out_f)
    assert torch.equal(side_backward_x_segmented(gy, *args), side_backward_x_segmented_cpu(gy, *args))


def test_triton_segments_with_an_unknown_adapter_come_out_nan():
    out_f, in_f, _, idx, vals, offsets, starts, ids, x = _mixed_batch()
    ids = ids.clone()
    ids[2] = 9  # rows 8..14
    on = lambda *ts: [t.to(DEVICE) for t in ts]
    y = side_forward_segmented_triton(*on(x, starts, ids, idx, vals, offsets), out_f, in_f).cpu()
    assert y.isnan().all(1).nonzero().flatten().tolist() == list(range(8, 15))
    with pytest.raises(ValueError, match=r"seg_adapters\[2\] = 9"):
        side_forward_segmented_cpu(x, starts, ids, idx, vals, offsets, out_f, in_f)


def test_a_new_request_mix_does_not_recompile():
    """Wrapped as a custom op, a compiled caller sees only tensors: changing which adapter each
    segment uses changes values, not shapes, so the graph is reused."""
    lib = "shira_fx_test_side"

    @torch.library.custom_op(f"{lib}::seg_forward", mutates_args=())
    def seg_forward(x: torch.Tensor, starts: torch.Tensor, ids: torch.Tensor, idx: torch.Tensor,
                    vals: torch.Tensor, offsets: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
        return side_forward_segmented(x, starts, ids, idx, vals, offsets, out_f, in_f)

    @seg_forward.register_fake
    def _(x, starts, ids, idx, vals, offsets, out_f, in_f):
        return x.new_empty(x.shape[0], out_f)

    out_f, in_f, _, idx, vals, offsets, starts, ids, x = _mixed_batch()
    base = torch.nn.Linear(in_f, out_f)

    def layer(x, starts, ids):
        return base(x) + seg_forward(x, starts, ids, idx, vals, offsets, out_f, in_f)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False)
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for mix in (ids, ids.flip(0), torch.full_like(ids, -1), torch.tensor([3, 3, 1, 0, 2, 2, 0])):
            expected = base(x) + side_forward_segmented_reference(x, starts, mix, idx, vals, offsets,
                                                                  out_f, in_f)
            assert torch.allclose(compiled(x, starts, mix), expected, atol=1e-6)
    torch._dynamo.reset()


def test_pack_adapters_offsets():
    a = (torch.tensor([1, 4]), torch.tensor([1.0, 2.0]))
    b = (torch.tensor([], dtype=torch.int64), torch.tensor([]))
    c = (torch.tensor([0]), torch.tensor([3.0]))
    idx, vals, offsets = pack_adapters([a, b, c])
    assert idx.tolist() == [1, 4, 0] and vals.tolist() == [1.0, 2.0, 3.0]
    assert offsets.tolist() == [0, 2, 2, 3] and offsets.dtype == torch.int64
    with pytest.raises(ValueError, match="at least one"):
        pack_adapters([])


# --------------------------------------------------------------------------------------------
# argument errors name the argument, what was expected and what was found


@pytest.mark.parametrize("fn", [side_forward_cpu, side_forward_triton])
def test_single_rejects_bad_arguments(fn):
    x, idx, vals = torch.randn(4, 6), torch.tensor([0, 7]), torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 6\) \(in_features = 6\), found"):
        fn(x[:, :5], idx, vals, 5, 6)
    with pytest.raises(ValueError, match="x must be fp32, bf16 or fp16, found torch.int64"):
        fn(x.long(), idx, vals, 5, 6)
    with pytest.raises(ValueError, match=r"indices must be 1-D int32 or int64, found .* torch.float32"):
        fn(x, idx.float(), vals, 5, 6)
    with pytest.raises(ValueError, match=r"values must be .* the indices' shape \(2,\), found shape \(3,\)"):
        fn(x, idx, torch.ones(3), 5, 6)
    with pytest.raises(ValueError, match="out_features must be a non-negative int, found -5"):
        fn(x, idx, vals, -5, 6)
    with pytest.raises(ValueError, match="indices must be on cpu .*, found meta"):
        fn(x, idx.to("meta"), vals, 5, 6)


def test_backward_names_grad_y_and_the_cpu_path_refuses_other_devices():
    gy = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"grad_y must have shape \(\.\.\., 5\) \(out_features = 5\)"):
        side_backward_x_cpu(gy[:, :4], torch.tensor([0]), torch.tensor([1.0]), 5, 6)
    with pytest.raises(ValueError, match="the CPU path needs CPU tensors, found grad_y on meta"):
        side_backward_x_cpu(gy.to("meta"), torch.tensor([0], device="meta"),
                            torch.tensor([1.0], device="meta"), 5, 6)


def test_segmented_rejects_bad_tables():
    out_f, in_f, _, idx, vals, offsets, starts, ids, x = _mixed_batch()
    f = side_forward_segmented_cpu
    with pytest.raises(ValueError, match=r"seg_starts must have one more entry than seg_adapters \(8\)"):
        f(x, starts[:-1], ids, idx, vals, offsets, out_f, in_f)
    with pytest.raises(ValueError, match=r"seg_starts\[2\] = 3 after 5"):
        f(x, torch.tensor([1, 5, 3, 15, 15, 18, 20, 26]), ids, idx, vals, offsets, out_f, in_f)
    with pytest.raises(ValueError, match=r"within \[0, 28\] .* found 1 \.\. 30"):
        f(x, torch.tensor([1, 5, 8, 15, 15, 18, 20, 30]), ids, idx, vals, offsets, out_f, in_f)
    with pytest.raises(ValueError, match="adapter_offsets must rise from 0 to 88"):
        f(x, starts, ids, idx, vals, offsets - 1, out_f, in_f)
    with pytest.raises(ValueError, match="seg_adapters must be 1-D int32 or int64, found .* torch.float32"):
        f(x, starts, ids.float(), idx, vals, offsets, out_f, in_f)
    with pytest.raises(ValueError, match=r"x must have shape \(T, 7\)"):
        f(x[None], starts, ids, idx, vals, offsets, out_f, in_f)

