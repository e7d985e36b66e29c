"""The backend checks its own compiled gradients: the first call of each training graph
compares the values' gradients with a reference compile (aot_eager) and refuses a graph that
gets them wrong, before any optimizer step uses them; random numbers, buffers updated in place
and `.grad` are as without the check; known upstream bugs are avoided by default (Inductor's
layout optimization and convolution gradients, reproduced here without shira_fx)."""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import shira_fx
from shira_fx.compile import verify as verify_module
from tests import tiny_models


def _doubling_backward():
    """An inner compiler that gets every gradient wrong (twice the truth): what a miscompile
    looks like from outside."""
    def bw(gm, example_inputs):
        def run(*args):
            return [None if g is None else 2 * g for g in gm(*args)]
        return make_boxed_func(run)

    return aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=bw)


def _exact():
    nop = lambda gm, _: make_boxed_func(gm)  # noqa: E731
    return aot_autograd(fw_compiler=nop, bw_compiler=nop)


class _DropoutNorm(nn.Module):
    """Dropout and a BatchNorm (a buffer updated in place) around two prepared linears."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(nn.functional.dropout(torch.relu(self.norm(self.a(x))), 0.5, self.training))


def _prepared(model):
    return shira_fx.prepare(model, shira_fx.ShiraConfig(target_modules=["a", "b"], density=0.3),
                            progress=False)


def test_a_graph_with_wrong_gradients_is_refused_before_any_step():
    torch._dynamo.reset()
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    compiled = torch.compile(model, backend=shira_fx.backend(inner=_doubling_backward()))
    x = torch.randn(6, 24)
    for _ in range(2):  # refused every time until a check passes
        with pytest.raises(shira_fx.ShiraTrainingError,
                           match=r"reference's in 3 of 3 layer\(s\).*0: 1\b.*No optimizer step"):
            compiled(x)
    assert all(la.values.grad is None for la in adapter.layers.values())
    unchecked = torch.compile(model, backend=shira_fx.backend(inner=_doubling_backward(), verify=False))
    torch._dynamo.reset()
    unchecked(x).pow(2).mean().backward()  # verify=False trains on what the compiler gives
    assert all(la.values.grad is not None for la in adapter.layers.values())


def test_the_check_runs_once_and_leaves_random_numbers_buffers_and_grads_as_they_were(monkeypatch):
    calls = []
    real = verify_module.FirstCallVerified._check
    monkeypatch.setattr(verify_module.FirstCallVerified, "_check",
                        lambda self, args: (calls.append(1), real(self, args)))
    results = {}
    for checked in (True, False):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _DropoutNorm()
        adapter = _prepared(model)
        backend = shira_fx.backend(inner=_exact(), verify=checked)  # a callable inner: checked
        compiled = torch.compile(model, backend=backend)
        x = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        losses = [compiled(x).pow(2).mean() for _ in range(3)]
        losses[0].backward()
        results[checked] = ([loss.item() for loss in losses], model.norm.running_mean.clone(),
                            [la.values.grad.clone() for la in adapter.layers.values()], backend)
    assert len(calls) == 1  # the first call of the one graph, then never again
    (l1, mean1, g1, b1), (l2, mean2, g2, _) = results[True], results[False]
    assert l1 == l2  # the same dropout masks: the check restored the random state
    assert torch.equal(mean1, mean2)  # the running stats were updated by the real calls only
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    assert "gradients verified against aot_eager at the first call" in shira_fx.explain(b1)


def test_verify_compares_a_model_layer_by_layer():
    model = tiny_models.build("llama")
    shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    found = shira_fx.verify(model, tiny_models.batch("llama"), inner="aot_eager")
    assert found.ok and len(found.layers) == 14
    assert all(c.relative < 1e-5 for c in found.layers)
    assert "| model.layers.0.self_attn.q_proj |" in found.table()
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated
    with pytest.raises(shira_fx.ShiraTrainingError, match="carries no prepared layer"):
        shira_fx.verify(tiny_models.build("mlp"), tiny_models.batch("mlp"), lambda m, b: m(b["x"]).sum())


def test_shira_fx_check_prints_the_table_for_a_model_folder(tmp_path, capsys):
    from shira_fx.cli import main

    tiny_models.build("bert").bert.save_pretrained(tmp_path / "bert")
    assert main(["check", "--model", str(tmp_path / "bert"), "--inner", "aot_eager", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.0.attention.self.query" not in out  # the classifier names its backbone
    assert "| backbone.encoder.layer.0.attention.self.query | 0.00e+00 |" in out
    assert "compiled gradients equal eager's" in out


# -- the known upstream bug, on a tiny diffusers UNet (slow: Inductor compiles it whole) ------------


def _unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def _unet_loss(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 32, generator=g)
    return unet(x, torch.tensor([3, 7]), encoder_hidden_states=ctx).sample.pow(2).mean()


ATTENTION = r".*attn\d\.to_(q|k|v|out\.0)$"


@pytest.mark.slow
def test_inductor_layout_optimization_breaks_conv_gradients_without_shira_fx():
    """The upstream bug the backend avoids: plain Inductor, no shira_fx. When this test fails,
    torch has fixed it, and the backend's workaround (layout_optimization off for graphs with
    convolutions) can go."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    eager = _unet()
    _unet_loss(eager).backward()
    compiled = _unet()
    with inductor_config.patch(layout_optimization=True):
        _unet_loss(torch.compile(compiled, backend="inductor")).backward()
    wrong = [n for (n, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True)
             if not torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-5)]
    assert len(wrong) > 50, "Inductor computes the UNet's gradients right now: drop the workaround"


@pytest.mark.slow
def test_a_unet_compiled_with_shira_fx_gets_the_eager_gradients_and_refuses_the_bug():
    torch._dynamo.reset()
    cfg = shira_fx.ShiraConfig(target_modules=ATTENTION, density=0.05)
    eager, compiled = _unet(), _unet()
    eager_adapter = shira_fx.prepare(eager, cfg, progress=False)
    adapter = shira_fx.prepare(compiled, cfg, progress=False)
    _unet_loss(eager).backward()
    backend = shira_fx.backend()
    _unet_loss(torch.compile(compiled, backend=backend)).backward()
    assert len(adapter.layers) == 32
    for (name, la), other in zip(adapter.layers.items(), eager_adapter.layers.values(), strict=True):
        rel = float((la.values.grad - other.values.grad).norm() / other.values.grad.norm())
        assert rel < 1e-4, (name, rel)
    assert "gradients verified against aot_eager" in shira_fx.explain(backend)
    torch._dynamo.reset()
    with pytest.raises(shira_fx.ShiraTrainingError, match=r"attn1\.to_q: .*layout_optimization = False"):
        _unet_loss(torch.compile(compiled, backend=shira_fx.backend(), options={"layout_optimization": True}))
