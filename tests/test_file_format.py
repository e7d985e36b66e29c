"""The shira_fx file, version 2: every mask kind saved and served gives the trained model's logits
bit for bit, each layer's indices take the code of what they are, bf16 values are an explicit
lossy option, and version 1 files (the fixture the version 1 writer produced, and files written
as it wrote them) still load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import shira_fx
from shira_fx import SparseAdapter
from shira_fx.config import MASK_KINDS
from tests import file_kit, tiny_models

CODE_OF_MASK = {"rand": "rand", "struct": "struct", "wm": "gaps", "grad": "gaps", "snip": "gaps"}


def trained(mask: str, kind: str = "llama", seed: int = 0, **cfg) -> tuple[nn.Module, SparseAdapter]:
    """A prepared tiny model whose values are random (as after training), synced into its weights."""
    model = tiny_models.build(kind)
    calib = [tiny_models.batch(kind, seed=s) for s in range(2)] if mask in ("grad", "snip") else None
    cfg.setdefault("density", 0.05)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(mask=mask, seed=seed, **cfg), calib=calib,
                               loss_fn=tiny_models.loss, progress=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.copy_(torch.randn(layer.values.shape, generator=g) * 0.1)
    adapter.sync()
    return model, adapter


def logits(model, kind: str = "llama") -> torch.Tensor:
    with torch.no_grad():
        out = model(**{k: v for k, v in tiny_models.batch(kind).items() if k != "labels"})
    return out.logits


def served(path, kind: str = "llama") -> torch.Tensor:
    model = tiny_models.build(kind)
    bank = shira_fx.AdapterBank(model)
    bank.load("x", path)
    bank.activate("x")
    return logits(model, kind)


@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_every_mask_kind_saved_and_served_gives_the_trained_logits_bit_for_bit(tmp_path, mask, kind):
    model, adapter = trained(mask, kind)
    path = tmp_path / "a.safetensors"
    adapter.save(path)
    table = json.loads(load_file_metadata(path)["layers"])
    assert set(table["code"]) == {CODE_OF_MASK[mask]}, table["code"]
    assert torch.equal(served(path, kind), logits(model, kind))


def load_file_metadata(path) -> dict:
    return file_kit.header(path.read_bytes())[0]["__metadata__"]


def test_a_hand_made_mask_under_a_rand_config_is_not_written_as_a_recipe(tmp_path):
    model, adapter = trained("rand")
    layer = next(iter(adapter.layers.values()))
    hand_made = layer.indices.clone()
    hand_made[0] = 0 if hand_made[0] else int(hand_made[1]) - 1  # another valid position
    hand_made = hand_made.sort().values
    stored = adapter.snapshot()
    tensors = {n: stored.tensors(n, s.shape) for n, s in stored.layers.items()}
    name = layer.name
    tensors[name] = (hand_made.long(), tensors[name][1])
    shira_fx.adapter_files.write_shira_fx(tmp_path / "a.safetensors", adapter.cfg, stored.layers, tensors)
    table = json.loads(load_file_metadata(tmp_path / "a.safetensors")["layers"])
    assert table["code"][table["name"].index(name)] != "rand"
    idx, _ = shira_fx.load_adapter(tmp_path / "a.safetensors").tensors(name, layer.shape)
    assert torch.equal(idx, hand_made.long())


def test_bf16_values_halve_the_file_and_serve_the_rounded_values(tmp_path):
    model, adapter = trained("rand", density=0.3)
    adapter.save(tmp_path / "fp32.safetensors")
    adapter.save(tmp_path / "bf16.safetensors", values_dtype=torch.bfloat16)
    fp32, bf16 = ((tmp_path / f"{d}.safetensors").stat().st_size for d in ("fp32", "bf16"))
    values = sum(la.values.numel() for la in adapter.layers.values())
    assert fp32 - bf16 == 2 * values
    assert load_file(tmp_path / "bf16.safetensors")["values"].dtype == torch.bfloat16
    stored = shira_fx.load_adapter(tmp_path / "bf16.safetensors")
    for name, layer in adapter.layers.items():
        _, vals = stored.tensors(name, layer.shape)
        assert vals.dtype == torch.float32
        assert torch.equal(vals, layer.values.detach().to(torch.bfloat16).float())
    with torch.no_grad():  # the trained model with its values rounded as the file holds them
        for layer in adapter.layers.values():
            layer.values.copy_(layer.values.to(torch.bfloat16).float())
    adapter.sync()
    assert torch.equal(served(tmp_path / "bf16.safetensors"), logits(model))


def test_values_that_do_not_fit_the_asked_dtype_are_refused(tmp_path):
    _, adapter = trained("rand")
    with torch.no_grad():
        next(iter(adapter.layers.values())).values[0] = 1e6
    with pytest.raises(shira_fx.ShiraAdapterError, match="overflow torch.float16"):
        adapter.save(tmp_path / "a.safetensors", values_dtype=torch.float16)
    with pytest.raises(shira_fx.ShiraAdapterError, match="values_dtype must be one of"):
        adapter.save(tmp_path / "a.safetensors", values_dtype=torch.int8)
    assert not list(tmp_path.iterdir())


def test_the_version_1_fixture_loads_as_the_version_1_writer_wrote_it():
    raw = load_file(file_kit.FIXTURE_V1)
    stored = shira_fx.load_adapter(file_kit.FIXTURE_V1)
    assert len(stored.layers) == 3 and stored.cfg.r == 2
    for name, spec in stored.layers.items():
        idx, vals = stored.tensors(name, spec.shape)
        assert torch.equal(idx, raw[f"{name}.indices"].long()) and torch.equal(vals, raw[f"{name}.values"])
    bank = shira_fx.AdapterBank(tiny_models.build("mlp"))
    bank.load("v1", file_kit.FIXTURE_V1, check_base=False)
    bank.activate("v1")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_version_1_file_serves_what_its_version_2_file_serves(tmp_path, kind):
    model, adapter = trained("wm", kind)
    (tmp_path / "v1.safetensors").write_bytes(file_kit.v1_bytes(adapter))
    adapter.save(tmp_path / "v2.safetensors")
    assert load_file_metadata(tmp_path / "v1.safetensors")["format_version"] == "1"
    assert torch.equal(served(tmp_path / "v1.safetensors", kind), logits(model, kind))
    assert torch.equal(served(tmp_path / "v2.safetensors", kind), logits(model, kind))
    assert (tmp_path / "v2.safetensors").stat().st_size < 0.7 * (tmp_path / "v1.safetensors").stat().st_size


def test_moe_expert_rand_masks_are_one_recipe_with_a_block_per_expert(tmp_path):
    from tests.arch_table import ARCHS

    model = next(a for a in ARCHS if a.name == "mixtral").build(0)
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1, target_parameters=experts),
                               progress=False)
    adapter.save(tmp_path / "moe.safetensors")
    table = json.loads(load_file_metadata(tmp_path / "moe.safetensors")["layers"])
    stored = shira_fx.load_adapter(tmp_path / "moe.safetensors")
    for row, name in enumerate(table["name"]):
        layer = adapter.layers[name]
        blocks = layer.shape[0] if name.endswith(("gate_up_proj", "down_proj")) else 1
        assert table["code"][row] == "rand" and table["args"][row][1] == blocks, name
        assert torch.equal(stored.tensors(name, layer.shape)[0], layer.indices.long())
    assert any(args[1] > 1 for args in table["args"]), "no expert parameter was adapted"
