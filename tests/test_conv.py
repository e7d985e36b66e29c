"""SHiRA on convolutions (nn.Conv1d, nn.Conv2d; groups, stride, dilation, padding modes): the
masked weight gradient on both paths against the dense oracle, the values' gradient eagerly
and compiled against the dense model's at the mask, every mask kind, the fused-weight sync,
a bank's switch and fusion equal to a dense-merged twin, and the base restored bit-exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import shira_fx
from shira_fx.kernels.masked_conv import conv_weight_grad_at, conv_weight_grad_reference
from tests.conftest import budget


@st.composite
def conv_cases(draw):
    d = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    cg, og = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride, dilation, padding = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(0, 2))
    size = draw(st.integers(dilation * (k - 1) + 1, 9))
    n = draw(st.integers(1, 2))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(n, cg * groups, *([size] * d), generator=g).to(dtype)
    w_shape = [og * groups, cg, *([k] * d)]
    conv = nn.functional.conv1d if d == 1 else nn.functional.conv2d
    y = conv(x.float(), torch.zeros(w_shape), None, stride, padding, dilation, groups)
    gy = torch.randn(y.shape, generator=g).to(dtype)
    numel = torch.Size(w_shape).numel()
    nnz = draw(st.integers(1, numel))
    index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    idx = torch.randperm(numel, generator=g)[:nnz].sort().values.to(index_dtype)
    return x, gy, idx, w_shape, [stride] * d, [padding] * d, [dilation] * d, groups


@pytest.mark.fuzz
@settings(max_examples=budget(200, 10), deadline=None)
@given(conv_cases())
def test_both_paths_of_the_masked_conv_gradient_match_the_dense_oracle(case):
    x, gy, idx, w_shape, stride, padding, dilation, groups = case
    want = conv_weight_grad_reference(x, gy, idx, w_shape, stride, padding, dilation, groups)
    scale = float(want.abs().max()) + 1e-6
    tol = 1e-5 if x.dtype == torch.float32 else 1e-2  # bf16 inputs: exact products, fp32 sums
    for path in ("sparse", "dense"):
        got = conv_weight_grad_at(x, gy, idx, w_shape, stride, padding, dilation, groups, path=path)
        assert got.dtype == torch.float32 and got.shape == idx.shape
        assert float((got - want).abs().max()) <= tol * scale, path


class Convs(nn.Module):
    """Every geometry the adapter handles: groups, stride, dilation, reflect padding, 'same'
    padding, a 1x1, a Conv1d, with GroupNorm + SiLU between (a UNet resnet's chain)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", dilation=1)
        self.c4 = nn.Conv2d(8, 8, 2, padding="same")
        self.c5 = nn.Conv2d(8, 6, 1)
        self.c6 = nn.Conv1d(6, 5, 3, padding=2, dilation=2)

    def forward(self, x):
        h = self.c2(nn.functional.silu(self.norm(self.c1(x))))
        h = self.c5(self.c4(self.c3(h)))
        return self.c6(h.flatten(2))


TARGETS = ["c1", "c2", "c3", "c4", "c5", "c6"]


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return Convs()


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(seed))


def _loss(model, x) -> torch.Tensor:
    return model(x).pow(2).mean()


def _prepare(model, mask: str = "rand", density: float = 0.2):
    calib = [_batch(7)] if mask in ("grad", "snip") else None
    return shira_fx.prepare(model, shira_fx.ShiraConfig(target_modules=TARGETS, density=density, mask=mask),
                            calib=calib, loss_fn=lambda m, b: _loss(m, b), progress=False)


@pytest.mark.parametrize("mode", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("mask", ["rand", "struct", "wm", "grad", "snip"])
def test_conv_values_get_the_dense_gradient_at_the_mask(mask, mode):
    torch._dynamo.reset()
    dense, model = _model(), _model()
    adapter = _prepare(model, mask)
    assert [la.conv for la in adapter.layers.values()] == [True] * len(TARGETS)
    run = model if mode == "eager" else torch.compile(model, backend=shira_fx.backend(inner=mode))
    _loss(run, _batch()).backward()
    _loss(dense, _batch()).backward()
    for name, la in adapter.layers.items():
        want = dense.get_submodule(name).weight.grad.reshape(-1)[la.indices.long()]
        assert la.values.grad is not None, name
        rel = float((la.values.grad - want).norm() / want.norm().clamp_min(1e-12))
        assert rel < 1e-4, (name, rel)


def test_a_struct_mask_on_a_kernel_is_output_channels_and_a_diagonal():
    model = _model()
    adapter = _prepare(model, "struct", density=0.3)
    la = adapter.layers["c1"]  # (8, 4, 3, 3): the (8, 36) matrix of output channels by fan-in
    assert la.indices.numel() == adapter.cfg.budget(8, 36)
    rows = torch.bincount(la.indices.long() // 36, minlength=8)
    assert int((rows == 36).sum()) >= 1  # whole output channels (every tap of every input)
    diag = {r * 36 + r for r in range(8)}
    assert diag <= set(la.indices.tolist())


def test_conv_training_syncs_switches_and_restores_bit_exactly(tmp_path):
    model = _model()
    base = copy.deepcopy(model.state_dict())
    adapter = _prepare(model)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    compiled = torch.compile(model, backend=shira_fx.backend(inner="aot_eager"))
    for i in range(4):
        _loss(compiled, _batch(i)).backward()
        opt.step()
        opt.zero_grad()
    for name, la in adapter.layers.items():
        w, w0 = la.weight.detach().reshape(-1), base[f"{name}.weight"].reshape(-1)
        idx = la.indices.long()
        assert torch.equal(w[idx], w0[idx] + la.values.detach()), name
        untouched = torch.ones_like(w0, dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(w[untouched], w0[untouched]), name
    x = _batch(9)
    with torch.no_grad():
        trained = model(x)
    adapter.save(tmp_path / "a.safetensors")
    with pytest.raises(shira_fx.ShiraAdapterError, match="PEFT SHiRA supports only nn.Linear"):
        adapter.to_peft(tmp_path / "peft")
    adapter.remove()
    for name, p in model.state_dict().items():
        assert torch.equal(p, base[name]), name

    other = _model()
    other_adapter = shira_fx.prepare(other, shira_fx.ShiraConfig(target_modules=TARGETS, density=0.2, seed=5),
                                     progress=False)
    with torch.no_grad():
        for la in other_adapter.layers.values():
            la.values.normal_(0, 0.05)
    other_adapter.save(tmp_path / "b.safetensors")
    bank = shira_fx.AdapterBank(model)
    bank.load("a", tmp_path / "a.safetensors")
    bank.load("b", tmp_path / "b.safetensors")
    bank.activate("a")
    with torch.no_grad():
        assert torch.equal(model(x), trained)
    bank.activate({"a": 1.0, "b": 0.5})
    twin = _model()  # the dense-merged fusion
    with torch.no_grad():
        for name, la in adapter.layers.items():
            w = twin.get_submodule(name).weight.view(-1)
            delta = torch.zeros_like(w, dtype=torch.float32)
            delta.index_add_(0, la.indices.long(), la.values.detach().float())
            ob = other_adapter.layers[name]
            delta.index_add_(0, ob.indices.long(), ob.values.detach().float() * 0.5)
            w.copy_((w.float() + delta).to(w.dtype))
        assert torch.equal(model(x), twin(x))
    with pytest.raises(shira_fx.ShiraAdapterError, match="is a convolution; mixed batches serve linear"):
        with bank.per_request(["a", "b"]):
            pass
    bank.deactivate()
    for name, p in model.state_dict().items():
        assert torch.equal(p, base[name]), name


def test_a_conv_adapter_survives_a_deep_copy_and_a_cast():
    model = _model()
    adapter = _prepare(model)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    _loss(model, _batch()).backward()
    opt.step()
    twin = copy.deepcopy(model)
    twin_adapter = shira_fx.SparseAdapter.of(twin)
    _loss(twin, _batch(1)).backward()
    torch.optim.SGD(twin_adapter.parameters(), lr=0.1).step()
    twin.bfloat16()
    for name, la in twin_adapter.layers.items():
        assert la.values.dtype == torch.float32
        fused = la.weight.detach().reshape(-1)[la.indices.long()]
        assert torch.equal(fused, (la.base.float() + la.values.detach()).to(torch.bfloat16)), name
    assert not torch.equal(twin_adapter.layers["c1"].values, adapter.layers["c1"].values)
