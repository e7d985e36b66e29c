"""MoE experts stored as 3-D parameters (`target_parameters`): a mask over each expert's matrix,
the values' gradient equal to the masked dense gradient eager and compiled, files and the bank
serving the trained outputs, deactivate restoring the base bit-exactly."""

from __future__ import annotations

import copy

import pytest
import torch

import shira_fx
from shira_fx import ShiraConfig, ShiraConfigError

pytest.importorskip("transformers")
from tests.arch_table import ARCHS as _TABLE  # noqa: E402  (the shared table of tiny models)

ARCHS = {arch.name: arch for arch in _TABLE}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def mixtral(seed: int = 0):
    return ARCHS["mixtral"].build(seed)


def qwen3_moe(seed: int = 0):
    return ARCHS["qwen3_moe"].build(seed)


BUILDERS = {"mixtral": mixtral, "qwen3_moe": pytest.param(qwen3_moe, marks=pytest.mark.slow)}


def _batch(seed: int = 0) -> dict:
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def test_a_mask_per_expert_with_the_budget_of_each_expert_matrix():
    model = mixtral()
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.1, target_parameters=EXPERTS), progress=False)
    layer = adapter.layers["model.layers.0.mlp.experts.gate_up_proj"]
    experts, out_f, in_f = layer.shape
    per_expert = adapter.cfg.budget(out_f, in_f)
    idx = layer.indices.long()
    assert idx.numel() == experts * per_expert and torch.all(idx[1:] > idx[:-1])
    counts = torch.bincount(idx // (out_f * in_f), minlength=experts)
    assert counts.tolist() == [per_expert] * experts
    assert set(model.state_dict()) == set(mixtral().state_dict())


@pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS.keys())
@pytest.mark.parametrize("mode", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow)])
def test_expert_values_get_the_masked_dense_gradient(build, mode):
    torch._dynamo.reset()
    model = build()
    twin = copy.deepcopy(model)
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.1, target_parameters=EXPERTS), progress=False)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.normal_(0, 0.05)
    adapter.sync()
    twin.load_state_dict(model.state_dict())
    for p in twin.parameters():
        p.requires_grad_(True)
    twin(**_batch()).loss.backward()
    run = model if mode == "eager" else torch.compile(model, backend=shira_fx.backend(inner=mode))
    run(**_batch()).loss.backward()
    experts = [n for n in adapter.layers if "experts" in n]
    assert len(experts) == 2 * model.config.num_hidden_layers
    for name, layer in adapter.layers.items():
        tensor = twin.get_parameter(name if layer.param != "weight" else f"{name}.weight")
        want = tensor.grad.view(-1)[layer.indices.long()]
        got = layer.values.grad
        assert got is not None, name
        assert float((got - want).norm() / want.norm()) < 1e-5, name


def test_a_saved_moe_adapter_serves_the_trained_outputs_and_deactivates_exactly(tmp_path):
    model = mixtral()
    base = copy.deepcopy(model.state_dict())
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.1, target_parameters=EXPERTS), progress=False)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)

    @shira_fx.train_step(adapter, opt)
    def step(batch):
        return model(**batch).loss

    losses = [step(_batch(i % 2)) for i in range(6)]
    assert losses[-1] < losses[0]
    adapter.save(tmp_path / "moe.safetensors")
    ids = _batch(5)["input_ids"]
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    served = mixtral()
    bank = shira_fx.AdapterBank(served)
    bank.load("moe", tmp_path / "moe.safetensors")
    bank.activate("moe")
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, trained, rtol=0, atol=0)
    bank.deactivate()
    for k, v in served.state_dict().items():
        assert torch.equal(v, base[k]), k
    with pytest.raises(shira_fx.ShiraAdapterError, match="3-D parameter"):
        adapter.to_peft(tmp_path / "peft")


def test_what_target_parameters_cannot_take_is_refused_by_name():
    with pytest.raises(ShiraConfigError, match="no parameter .* is named"):
        shira_fx.prepare(mixtral(), ShiraConfig(target_parameters=["experts.nope"]), progress=False)
    with pytest.raises(ShiraConfigError, match="expected a 3-D"):
        shira_fx.prepare(mixtral(), ShiraConfig(target_parameters=["q_proj.weight"]), progress=False)
    with pytest.raises(ShiraConfigError, match="3-D parameters"):
        shira_fx.prepare(mixtral(), ShiraConfig(target_parameters=EXPERTS, mask="grad"),
                         calib=[_batch()], progress=False)
    with pytest.raises(ShiraConfigError, match="target_parameters"):
        ShiraConfig(target_parameters="experts.gate_up_proj")
