"""grad_values of the sparse op equals the dense dW gathered at the mask, eager and compiled."""

import copy

import pytest
import torch

import shira_fx
from shira_fx.kernels.structure import STRUCTURE_FIELDS
from shira_fx.layer import structure_of
from tests import tiny_models


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def dense_reference_grads(ref: torch.nn.Module, adapter, kind: str, b: dict) -> dict:
    """Train-free oracle: every weight requires grad, backward, gather dW at each mask."""
    for p in ref.parameters():
        p.requires_grad_(True)
    tiny_models.loss(ref, b).backward()
    mods = dict(ref.named_modules())
    return {
        name: mods[name].weight.grad.reshape(-1)[layer.indices.long()]
        for name, layer in adapter.layers.items()
    }


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "vit", "mlp"])
@pytest.mark.parametrize("mode", ["eager", "aot_eager"])
def test_grad_values_equal_dense_grad_at_mask(kind, mode):
    model = tiny_models.build(kind)
    ref = copy.deepcopy(model)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1, seed=3), progress=False)
    # a non-zero delta, so the fused weight (not the base) is what the gradient sees
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.normal_(0, 0.05)
    adapter.sync()
    ref.load_state_dict(model.state_dict())
    b = tiny_models.batch(kind)
    expected = dense_reference_grads(ref, adapter, kind, b)

    run = model if mode == "eager" else torch.compile(model, backend=shira_fx.backend(inner=mode))
    tiny_models.loss(run, b).backward()
    for name, layer in adapter.layers.items():
        assert layer.values.grad is not None, f"{name}: no gradient reached the values"
        assert rel_err(layer.values.grad, expected[name]) < 1e-5, name
    values = {id(la.values) for la in adapter.layers.values()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in values), \
        "the frozen base got a gradient"


@pytest.mark.slow
def test_inductor_grad_values_equal_dense_grad_at_mask():
    model = tiny_models.build("llama")
    ref = copy.deepcopy(model)
    cfg = shira_fx.ShiraConfig(target_modules=r".*(q_proj|v_proj|down_proj)$", density=0.05)
    adapter = shira_fx.prepare(model, cfg, progress=False)
    b = tiny_models.batch("llama")
    expected = dense_reference_grads(ref, adapter, "llama", b)
    backend = shira_fx.backend()
    tiny_models.loss(torch.compile(model, backend=backend), b).backward()
    assert sorted(backend.layers()) == sorted(adapter.layers)
    assert set(backend.layers().values()) == {"rewritten"}
    for name, layer in adapter.layers.items():
        assert rel_err(layer.values.grad, expected[name]) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_get_fp32_value_grads(dtype):
    model = tiny_models.build("mlp").to(dtype)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.2), progress=False)
    x = torch.randn(9, 24, dtype=dtype)
    model(x).float().pow(2).mean().backward()
    for name, layer in adapter.layers.items():
        assert layer.values.dtype == torch.float32
        assert layer.values.grad.dtype == torch.float32, name
        assert torch.isfinite(layer.values.grad).all()


@pytest.mark.parametrize("mode", ["eager", "aot_eager"])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_struct_mask_trains_through_its_plan(mode, transposed):
    """A mask with structure (struct: whole rows plus the diagonal) large enough to be planned:
    the masked gradient comes from dense GEMMs over its rows and diagonal plus the rest, and
    equals the dense gradient at the mask (nn.Linear, and a weight stored (in, out))."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    if transposed:
        from transformers.pytorch_utils import Conv1D

        model = torch.nn.Sequential(Conv1D(192, 160), torch.nn.Tanh(), Conv1D(96, 192))
    else:
        model = torch.nn.Sequential(torch.nn.Linear(160, 192), torch.nn.Tanh(), torch.nn.Linear(192, 96))
    ref = copy.deepcopy(model)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.2, mask="struct"), progress=False)
    perm = STRUCTURE_FIELDS.index("perm")
    assert all(structure_of(m)[perm].numel() for m in (model[0], model[2])), "the masks were not structured"
    x = torch.randn(24, 160)
    ref(x).pow(2).mean().backward()
    run = model if mode == "eager" else torch.compile(model, backend=shira_fx.backend(inner=mode))
    run(x).pow(2).mean().backward()
    for name, layer in adapter.layers.items():
        want = dict(ref.named_modules())[name].weight.grad.reshape(-1)[layer.indices.long()]
        assert rel_err(layer.values.grad, want) < 1e-5, name
