"""Training through shira_fx equals dense training with a masked gradient; no drift; the
train_step decorator's contract (accumulate, self-backward, clipping, refusals)."""

import copy

import pytest
import torch

import shira_fx
from tests import tiny_models


def masked_dense_reference(ref, adapter):
    """`ref` (a copy of the model made before prepare) trains its targeted weights in full,
    gradient masked to the adapter's indices: the definition of SHiRA training."""
    mods = dict(ref.named_modules())
    for p in ref.parameters():
        p.requires_grad_(False)
    params = []
    for name, layer in adapter.layers.items():
        w = mods[name].weight
        mask = torch.zeros(w.numel(), dtype=w.dtype)
        mask[layer.indices.long()] = 1
        mask = mask.view_as(w)
        w.requires_grad_(True)
        w.register_hook(lambda g, m=mask: g * m)
        params.append(w)
    return ref, params


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("kind,mode", [("mlp", "eager"), ("llama", "eager"),
                                       pytest.param("gpt2", "aot_eager", marks=pytest.mark.slow)])
def test_twenty_steps_equal_masked_dense_training(kind, mode, opt_name):
    model = tiny_models.build(kind)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ref = copy.deepcopy(model)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1, seed=1), progress=False)
    ref, ref_params = masked_dense_reference(ref, adapter)

    def make(params):
        if opt_name == "sgd":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9)
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)

    opt, ref_opt = make(adapter.parameters()), make(ref_params)
    run = model if mode == "eager" else torch.compile(model, backend=shira_fx.backend(inner=mode))

    @shira_fx.train_step(adapter, opt)
    def step(b):
        return tiny_models.loss(run, b)

    for i in range(20):
        b = tiny_models.batch(kind, seed=i)
        step(b)
        tiny_models.loss(ref, b).backward()
        ref_opt.step()
        ref_opt.zero_grad()

    mods, ref_mods = dict(model.named_modules()), dict(ref.named_modules())
    for name, layer in adapter.layers.items():
        w, w_ref = mods[name].weight, ref_mods[name].weight.detach()
        idx = layer.indices.long()
        untouched = torch.ones(w.numel(), dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(w.view(-1)[untouched], base[f"{name}.weight"].view(-1)[untouched])
        assert torch.equal(w_ref.reshape(-1)[untouched], w.view(-1)[untouched])
        moved = (w.view(-1)[idx] - base[f"{name}.weight"].view(-1)[idx]).abs().max()
        assert moved > 1e-5, f"{name}: training did not move the masked weights"
        torch.testing.assert_close(w.view(-1)[idx], w_ref.reshape(-1)[idx], rtol=1e-4, atol=2e-5)


def test_fused_weight_equals_base_plus_values_after_1000_steps():
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.05), progress=False)
    opt = torch.optim.AdamW(adapter.parameters(), lr=3e-3)

    @shira_fx.train_step(adapter, opt)
    def step(x):
        return model(x).sin().mean()

    g = torch.Generator().manual_seed(0)
    for _ in range(1000):
        step(torch.randn(6, 24, generator=g))
    for layer in adapter.layers.values():
        fused = layer.weight.detach().view(-1)[layer.indices.long()]
        assert torch.equal(fused, (layer.base + layer.values.detach()).to(fused.dtype))
        assert layer.values.abs().max() > 0.1


def test_optimizer_hook_syncs_weights_without_the_decorator():
    """Nothing to attach: every optimizer step syncs the layers whose values it holds, once."""
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    adapter.check_optimizer(opt)  # only checks the optimizer
    model(torch.randn(4, 24)).pow(2).mean().backward()
    calls = []
    real = shira_fx.ops.scatter_weights_
    shira_fx.ops.scatter_weights_ = lambda *a, **k: (calls.append(1), real(*a, **k))
    try:
        opt.step()
    finally:
        shira_fx.ops.scatter_weights_ = real
    assert len(calls) == 1
    for layer in adapter.layers.values():
        assert layer.values.abs().max() > 0
        fused = layer.weight.detach().view(-1)[layer.indices.long()]
        assert torch.equal(fused, layer.base + layer.values.detach())


def _trained_values(accumulate=1, self_backward=False, max_grad_norm=None, halves=False):
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)

    @shira_fx.train_step(adapter, opt, accumulate=accumulate, max_grad_norm=max_grad_norm)
    def step(x):
        loss = model(x).pow(2).mean()
        if self_backward:
            loss.backward()
        return loss

    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(5))
    if halves:
        step(x[:4])
        step(x[4:])
    else:
        step(x)
    return [layer.values.detach().clone() for layer in adapter.layers.values()]


def test_accumulate_two_half_batches_equals_one_full_batch():
    for a, b in zip(_trained_values(accumulate=2, halves=True), _trained_values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_step_that_calls_backward_itself_is_not_backpropagated_twice():
    for a, b in zip(_trained_values(self_backward=True), _trained_values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_max_grad_norm_clips_the_update():
    clipped = torch.cat(_trained_values(max_grad_norm=1e-3))
    # SGD with lr 0.1: the update's norm is lr * clipped grad norm
    assert clipped.norm() == pytest.approx(0.1 * 1e-3, rel=1e-4)


def test_non_finite_loss_is_refused_and_nothing_changes():
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())

    @shira_fx.train_step(adapter, opt)
    def step(x):
        return model(x).pow(2).mean() * float("nan")

    with pytest.raises(shira_fx.ShiraTrainingError, match="non-finite loss"):
        step(torch.randn(4, 24))
    for layer in adapter.layers.values():
        assert layer.values.grad is None and not layer.values.any()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_non_finite_gradient_skips_the_step():
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)

    @shira_fx.train_step(adapter, opt)
    def step(x):
        y = model(x)
        y.register_hook(lambda g: g * float("nan"))  # a finite loss whose gradient is NaN
        return y.mean()

    with pytest.raises(shira_fx.ShiraTrainingError, match="non-finite gradient"):
        step(torch.randn(16, 24))
    for layer in adapter.layers.values():
        assert layer.values.grad is None and not layer.values.any()


def test_scheduler_is_stepped_once_per_optimizer_step():
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    opt = torch.optim.SGD(adapter.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    @shira_fx.train_step(adapter, opt, accumulate=2, scheduler=sched)
    def step(x):
        return model(x).pow(2).mean()

    for _ in range(4):
        assert isinstance(step(torch.randn(2, 24)), float)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_bad_decorator_arguments_and_foreign_optimizer_are_refused():
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    with pytest.raises(ValueError, match="accumulate"):
        shira_fx.train_step(adapter, torch.optim.SGD(adapter.parameters(), lr=1), accumulate=0)
    foreign = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1)
    with pytest.raises(shira_fx.ShiraConfigError, match="none of this adapter's values"):
        shira_fx.train_step(adapter, foreign)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers: gradient_checkpointing_enable
@pytest.mark.parametrize("kind", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_gradient_checkpointing_trains_eagerly_and_compiled(kind):
    """With HF gradient checkpointing, the eager step and the compiled step (the pass enters
    the checkpointed bodies) give the gradients of the plain model, step after step."""
    model = tiny_models.build(kind)
    ref = copy.deepcopy(model)
    model.gradient_checkpointing_enable()
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    plain = shira_fx.prepare(ref, shira_fx.ShiraConfig(density=0.1), progress=False)
    b = tiny_models.batch(kind)
    tiny_models.loss(model, b).backward()
    tiny_models.loss(ref, b).backward()
    for layer, other in zip(adapter.layers.values(), plain.layers.values(), strict=True):
        torch.testing.assert_close(layer.values.grad, other.values.grad, rtol=1e-5, atol=1e-7)
        layer.values.grad = other.values.grad = None

    torch._dynamo.reset()
    backend = shira_fx.backend(inner="aot_eager")
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(plain.parameters(), lr=0.5)

    @shira_fx.train_step(adapter, opt)
    def step(batch):
        return compiled(**batch).loss

    @shira_fx.train_step(plain, ref_opt)
    def ref_step(batch):
        return ref(**batch).loss

    for i in range(3):
        batch = tiny_models.batch(kind, seed=i)
        torch.testing.assert_close(step(batch), ref_step(batch), rtol=1e-5, atol=1e-6)
    for layer, other in zip(adapter.layers.values(), plain.layers.values(), strict=True):
        assert layer.values.abs().sum() > 0
        torch.testing.assert_close(layer.values, other.values, rtol=1e-4, atol=1e-6)
    assert {n for r in backend.reports for n in r.checkpointed} == {
        n for n in adapter.layers if any(part.isdigit() for part in n.split("."))}
    assert "inside checkpointed regions" in shira_fx.explain(backend)
