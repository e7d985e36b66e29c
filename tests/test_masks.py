"""Masks: every kind returns exactly the budget of sorted unique int32 offsets into the weight as
stored, each kind matches a dense oracle, and grad/snip never form a dense weight gradient."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from shira_fx.config import MASK_KINDS, ShiraConfig
from shira_fx.errors import ShiraConfigError
from shira_fx.masks import build_masks
from shira_fx.memory import LiveTensorTracker
from shira_fx.targets import TargetLayer, find_targets
from tests.conftest import budget

FAST = settings(max_examples=budget(30, 10), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def one_layer(out_f: int, in_f: int, transposed: bool, seed: int = 0, dtype=torch.float32):
    """A model holding one linear layer (Conv1D when transposed) with random weights."""
    layer = Conv1D(out_f, in_f) if transposed else nn.Linear(in_f, out_f)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
    model = nn.Sequential(layer).to(dtype)
    return model, [TargetLayer("0", layer, transposed)]


def calib_for(in_f: int, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, in_f, generator=g).to(dtype) for _ in range(2)]


def square_loss(model, batch):
    return model(batch).float().pow(2).sum()


def masks_of(model, targets, cfg, calib=None, loss_fn=square_loss):
    return build_masks(model, targets, cfg, calib=calib, loss_fn=loss_fn, progress=False)


def dense_top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """The oracle: a stable sort by descending score, so ties go to the lower flat index."""
    order = torch.sort(-score.reshape(-1), stable=True).indices
    return order[:k].sort().values.to(torch.int32)


def assert_is_top_k(idx: torch.Tensor, score: torch.Tensor, k: int) -> None:
    """`idx` holds k positions whose scores are the k largest, up to float rounding (scores
    computed two ways differ in the last bits, which may swap near-ties at the boundary)."""
    flat = score.reshape(-1).double()
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[idx.long()] = True
    assert int(chosen.sum()) == k == idx.numel()
    if k < flat.numel():
        slack = 1e-5 * float(flat.abs().max()) + 1e-30
        assert float(flat[chosen].min()) >= float(flat[~chosen].max()) - slack


def logical(idx: torch.Tensor, t: TargetLayer) -> torch.Tensor:
    """The mask as a bool (out, in) matrix, whatever the stored layout."""
    m = torch.zeros(t.weight.numel(), dtype=torch.bool)
    m[idx.long()] = True
    m = m.view(t.weight.shape)
    return m.T if t.transposed else m


budgets = st.one_of(
    st.floats(0.001, 1.0).map(lambda d: {"density": d}),
    st.integers(1, 8).map(lambda r: {"r": r}),
)
shapes = st.tuples(st.integers(1, 64), st.integers(1, 64))


dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])


@pytest.mark.fuzz
@FAST
@given(shape=shapes, budget=budgets, seed=st.integers(0, 2**31), transposed=st.booleans(),
       dtype=dtypes)
def test_every_kind_returns_exactly_the_budget_sorted_unique_int32_and_repeats(
    shape, budget, seed, transposed, dtype
):
    out_f, in_f = shape
    model, targets = one_layer(out_f, in_f, transposed, seed % 1000, dtype)
    calib = calib_for(in_f, seed % 1000, dtype)
    for kind in MASK_KINDS:
        cfg = ShiraConfig(mask=kind, seed=seed, **budget)
        idx = masks_of(model, targets, cfg, calib)["0"]
        k = cfg.budget(out_f, in_f)
        assert idx.dtype == torch.int32 and idx.device.type == "cpu" and idx.dim() == 1, kind
        assert idx.numel() == k, kind
        assert bool((idx[1:] > idx[:-1]).all()), f"{kind}: not strictly increasing"
        assert int(idx.min()) >= 0 and int(idx.max()) < out_f * in_f, kind
        assert torch.equal(idx, masks_of(model, targets, cfg, calib)["0"]), kind


@pytest.mark.fuzz
@FAST
@given(shape=shapes, density=st.floats(0.02, 0.7), seed=st.integers(0, 2**31))
def test_rand_differs_across_seeds_and_layers(shape, density, seed):
    out_f, in_f = shape
    cfg = ShiraConfig(mask="rand", density=density, seed=seed)
    k, numel = cfg.budget(out_f, in_f), out_f * in_f
    assume(numel >= 32 and min(k, numel - k) >= 4)  # a repeat would be a 1-in-36k accident
    layer = nn.Linear(in_f, out_f)
    a = build_masks(layer, [TargetLayer("a", layer, False)], cfg, progress=False)["a"]
    b = build_masks(layer, [TargetLayer("b", layer, False)], cfg, progress=False)["b"]
    cfg2 = ShiraConfig(mask="rand", density=density, seed=seed + 1)
    a2 = build_masks(layer, [TargetLayer("a", layer, False)], cfg2, progress=False)["a"]
    assert not torch.equal(a, b) and not torch.equal(a, a2)


@pytest.mark.parametrize("density", [0.15, 0.5])  # the draw-and-dedupe sampler, then randperm
def test_rand_picks_every_position_equally_often(density):
    layer = nn.Linear(5, 4)
    target = [TargetLayer("w", layer, False)]
    counts = torch.zeros(20)
    trials = 2000
    for seed in range(trials):
        cfg = ShiraConfig(mask="rand", density=density, seed=seed)
        counts[build_masks(layer, target, cfg, progress=False)["w"].long()] += 1
    p = ShiraConfig(density=density).budget(4, 5) / 20
    sigma = (trials * p * (1 - p)) ** 0.5
    assert float((counts - trials * p).abs().max()) < 5 * sigma


@pytest.mark.fuzz
@FAST
@given(shape=shapes, budget=budgets, seed=st.integers(0, 2**31), transposed=st.booleans())
def test_struct_is_the_diagonal_plus_whole_rows_at_a_stride(shape, budget, seed, transposed):
    out_f, in_f = shape
    model, targets = one_layer(out_f, in_f, transposed)
    cfg = ShiraConfig(mask="struct", seed=seed, **budget)
    k, diag = cfg.budget(out_f, in_f), min(out_f, in_f)
    m = logical(masks_of(model, targets, cfg)["0"], targets[0])
    if k <= diag:  # too small for the diagonal: its first k elements
        assert m.diagonal()[:k].all() and int(m.sum()) == k
        return
    assert m.diagonal().all()
    full = set(m.all(dim=1).nonzero().view(-1).tolist())
    if k >= diag + in_f:
        assert full, "the budget fits a row but none was taken"

    def stride_rows(n: int) -> set[int]:
        f = out_f // n
        return {seed % f + i * f for i in range(n)}

    # The rows at stride f = out // n from row seed % f, plus at most one topped-up row.
    assert any(n >= 1 and stride_rows(n) <= full for n in (len(full), len(full) - 1)) or not full


def test_struct_seeds_that_differ_pick_disjoint_rows():
    layer = Conv1D(64, 32)  # logical (out=64, in=32), stored (32, 64)
    target = [TargetLayer("c", layer, True)]
    rows = []
    for seed in (0, 1):
        cfg = ShiraConfig(mask="struct", density=0.1, seed=seed)
        idx = build_masks(layer, target, cfg, progress=False)
        rows.append(set(logical(idx["c"], target[0]).all(dim=1).nonzero().view(-1).tolist()))
    assert rows[0] and rows[1] and not rows[0] & rows[1]


@pytest.mark.fuzz
@FAST
@given(
    shape=shapes,
    budget=budgets,
    transposed=st.booleans(),
    seed=st.integers(0, 1000),
    dtype=dtypes,
    ties=st.booleans(),
)
def test_wm_is_the_dense_top_k_of_abs_weight_ties_to_lower_index(
    shape, budget, transposed, seed, dtype, ties
):
    out_f, in_f = shape
    model, targets = one_layer(out_f, in_f, transposed, seed)
    if ties:  # a handful of distinct magnitudes: most of the top-k is decided by the tie rule
        with torch.no_grad():
            w = targets[0].weight
            w.copy_(torch.randint(-2, 3, w.shape, generator=torch.Generator().manual_seed(seed)))
    model.to(dtype)
    cfg = ShiraConfig(mask="wm", **budget)
    k = cfg.budget(out_f, in_f)
    oracle = dense_top_k(targets[0].weight.detach().float().abs(), k)
    assert torch.equal(masks_of(model, targets, cfg)["0"], oracle)


def mlp(seed: int, hidden: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, 3))


def dense_gradient_statistic(model, calib, loss_fn) -> dict[str, torch.Tensor]:
    """The oracle: ordinary backward per batch, summing |W.grad| (on a copy of the model)."""
    weights = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in weights.items()}
    for batch in calib:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        for n, p in weights.items():
            acc[n] += p.grad.double().abs()
    model.zero_grad(set_to_none=True)
    return {n.removesuffix(".weight"): a for n, a in acc.items() if n.endswith("weight")}


@pytest.mark.fuzz
@FAST
@given(hidden=st.integers(1, 24), density=st.floats(0.01, 1.0), seed=st.integers(0, 1000),
       batches=st.integers(1, 3))
def test_grad_and_snip_are_the_dense_top_k_of_accumulated_abs_gradients(
    hidden, density, seed, batches
):
    model = mlp(seed, hidden)
    g = torch.Generator().manual_seed(seed)
    calib = [torch.randn(4, 6, generator=g) for _ in range(batches)]
    targets = find_targets(model, ShiraConfig())
    stat = dense_gradient_statistic(copy.deepcopy(model), calib, square_loss)
    for kind in ("grad", "snip"):
        cfg = ShiraConfig(mask=kind, density=density)
        masks = masks_of(model, targets, cfg, calib)
        for t in targets:
            score = stat[t.name] * (t.weight.detach().double().abs() if kind == "snip" else 1)
            assert_is_top_k(masks[t.name], score, cfg.budget(t.out_features, t.in_features))


def test_grad_and_snip_on_gpt2_conv1d_match_dense_backward_with_the_default_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    g = torch.Generator().manual_seed(1)
    calib = []
    for _ in range(3):
        ids = torch.randint(0, 50, (2, 8), generator=g)
        calib.append({"input_ids": ids, "labels": ids})
    targets = find_targets(model, ShiraConfig())
    assert len(targets) == 4 and all(t.transposed for t in targets)
    masks = {kind: build_masks(model, targets, ShiraConfig(mask=kind, density=0.03), calib=calib,
                               progress=False) for kind in ("grad", "snip")}
    stat = dense_gradient_statistic(model, calib, lambda m, b: m(**b).loss)
    for t in targets:
        k = ShiraConfig(density=0.03).budget(t.out_features, t.in_features)
        assert_is_top_k(masks["grad"][t.name], stat[t.name], k)
        assert_is_top_k(masks["snip"][t.name], stat[t.name] * t.weight.detach().double().abs(), k)


def test_grad_leaves_requires_grad_flags_grads_and_hooks_as_they_were():
    model = mlp(0, 8)
    model[0].bias.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    model[4].weight.grad = torch.ones_like(model[4].weight)
    kept = model[4].weight.grad
    flags = [p.requires_grad for p in model.parameters()]
    targets = find_targets(model, ShiraConfig())
    masks_of(model, targets, ShiraConfig(mask="snip"), calib_for(6))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model[4].weight.grad is kept and bool((kept == 1).all())
    assert all(p.grad is None for n, p in model.named_parameters() if n != "4.weight")
    assert all(not m._forward_hooks for m in model.modules())


def test_missing_or_empty_calibration_names_the_kind_and_what_to_pass():
    model = mlp(0, 8)
    targets = find_targets(model, ShiraConfig())
    for kind in ("grad", "snip"):
        with pytest.raises(ShiraConfigError, match=f"mask='{kind}'.*calib="):
            masks_of(model, targets, ShiraConfig(mask=kind))
        with pytest.raises(ShiraConfigError, match=f"mask='{kind}'.*non-empty"):
            masks_of(model, targets, ShiraConfig(mask=kind), calib=[])


def test_a_nan_loss_names_the_batch_and_restores_the_model():
    model = mlp(0, 8)
    flags = [p.requires_grad for p in model.parameters()]
    targets = find_targets(model, ShiraConfig())

    def nan_on_second(m, b):
        loss = square_loss(m, b)
        return loss * float("nan") if float(b[0, 0]) == 2.0 else loss

    calib = [torch.ones(2, 6), torch.full((2, 6), 2.0)]
    with pytest.raises(ShiraConfigError, match="batch 1 is nan"):
        masks_of(model, targets, ShiraConfig(mask="grad"), calib, nan_on_second)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(not m._forward_hooks for m in model.modules())


def test_a_non_finite_gradient_names_the_layer_and_batch():
    model = mlp(0, 8)
    targets = find_targets(model, ShiraConfig())

    def sqrt_at_zero(m, b):  # value 0, infinite slope
        y = m(b)
        return (y - y.detach()).abs().sqrt().sum()

    message = "output of '[024]' is not finite in calibration batch 0"
    with pytest.raises(ShiraConfigError, match=message):
        masks_of(model, targets, ShiraConfig(mask="grad"), calib_for(6), sqrt_at_zero)


def test_the_default_loss_needs_a_loss_on_the_output():
    model = mlp(0, 8)
    targets = find_targets(model, ShiraConfig())
    with pytest.raises(ShiraConfigError, match="Sequential returned a Tensor with no loss"):
        masks_of(model, targets, ShiraConfig(mask="grad"), calib_for(6), loss_fn=None)


@pytest.mark.parametrize("kind", ["grad", "snip"])
def test_grad_and_snip_hold_one_weight_sized_statistic_at_a_time(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                          nn.Linear(256, 256))
    calib = [torch.randn(4, 256) for _ in range(3)]  # activations (4×256) far below a weight
    targets = find_targets(model, ShiraConfig())
    numel = 256 * 256
    with LiveTensorTracker() as tracker:
        masks_of(model, targets, ShiraConfig(mask=kind, density=0.02), calib)
    assert max(a.numel for a in tracker.allocations) <= numel
    scores = [a for a in tracker.allocations if a.numel == numel and a.nbytes >= 4 * numel]
    assert len(scores) == len(targets), f"expected one fp32 score per layer, saw {scores}"
    assert tracker.peak_bytes < 2 * 4 * numel, "two weight-sized fp32 tensors were alive at once"
    assert all(p.grad is None for p in model.parameters())
