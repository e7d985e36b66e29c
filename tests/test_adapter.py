"""SparseAdapter: exactly the values as parameters, state dict, atomic save, exact remove."""

import json

import pytest
import torch
from safetensors import safe_open

import shira_fx
from shira_fx.layer import structure_of
from tests import tiny_models


def prepared(kind="llama", **cfg):
    model = tiny_models.build(kind)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(**cfg), progress=False)
    return model, base, adapter


def test_parameters_are_exactly_the_values_and_the_base_is_frozen():
    """The model's trainable parameters are exactly the values (an optimizer built from
    `model.parameters()`, as HF Trainer builds one, trains the adapter), while its state_dict
    keeps the base model's keys."""
    model, base, adapter = prepared(density=0.05)
    assert [id(p) for p in adapter.parameters()] == [id(la.values) for la in adapter.layers.values()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in trainable] == [id(la.values) for la in adapter.layers.values()]
    assert set(model.state_dict()) == set(base)
    for name, layer in adapter.layers.items():
        idx = layer.indices
        assert idx.dtype == torch.int32 and idx.dim() == 1
        assert torch.all(idx[1:] > idx[:-1])
        assert layer.values.dtype == torch.float32 and not layer.values.any()
        assert layer.shape == tuple(dict(model.named_modules())[name].weight.shape)
        assert idx.numel() == adapter.cfg.budget(*layer.shape)


def test_state_dict_round_trip_restores_values_and_fused_weights():
    model, _, adapter = prepared(r=2)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.normal_()
    sd = {k: v.clone() for k, v in adapter.state_dict().items()}
    assert set(sd) == {f"{n}.{s}" for n in adapter.layers for s in ("indices", "values")}
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.zero_()
    adapter.load_state_dict(sd)
    for name, layer in adapter.layers.items():
        assert torch.equal(layer.values, sd[f"{name}.values"])
        fused = layer.weight.view(-1)[layer.indices.long()]
        assert torch.equal(fused, layer.base + layer.values.detach())


def test_load_state_dict_rejects_nan_and_foreign_masks_without_changing_anything():
    _, _, adapter = prepared(r=2)
    sd = {k: v.clone() for k, v in adapter.state_dict().items()}
    name = next(iter(adapter.layers))
    bad = dict(sd)
    bad[f"{name}.values"] = torch.full_like(sd[f"{name}.values"], float("nan"))
    with pytest.raises(shira_fx.ShiraAdapterError, match="NaN"):
        adapter.load_state_dict(bad)
    bad = dict(sd)
    bad[f"{name}.indices"] = sd[f"{name}.indices"].flip(0)
    with pytest.raises(shira_fx.ShiraAdapterError, match=name):
        adapter.load_state_dict(bad)
    assert all(not la.values.any() for la in adapter.layers.values())


def test_save_writes_a_version_2_file_whose_layer_table_and_tensors_give_the_adapter_back(tmp_path):
    model, _, adapter = prepared("gpt2", density=0.05)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.normal_()
    path = tmp_path / "a.safetensors"
    adapter.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == ["values"]  # rand masks are their recipes: no index bytes
        values = f.get_tensor("values")
    assert meta["format"] == "shira_fx" and meta["format_version"] == "2"
    assert shira_fx.ShiraConfig.from_dict(json.loads(meta["config"])) == adapter.cfg
    table = json.loads(meta["layers"])
    assert table["name"] == list(adapter.layers) and set(table["code"]) == {"rand"}
    row = table["name"].index("transformer.h.0.attn.c_attn")
    assert table["shape"][row] == [32, 96] and table["transposed"][row] is True
    assert adapter.layers["transformer.h.0.attn.c_attn"].fingerprint().startswith(table["fingerprint"][row])
    assert torch.equal(values, torch.cat([la.values.detach() for la in adapter.layers.values()]))
    stored = shira_fx.load_adapter(path)
    for name, layer in adapter.layers.items():
        idx, vals = stored.tensors(name, layer.shape)
        assert torch.equal(idx, layer.indices.long()) and torch.equal(vals, layer.values.detach())


def test_failed_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    _, _, adapter = prepared("mlp")
    path = tmp_path / "a.safetensors"
    adapter.save(path)
    before = path.read_bytes()

    def boom(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("shira_fx.atomic.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        adapter.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_remove_restores_the_base_bit_exactly_and_unfreezes_only_what_prepare_froze():
    model = tiny_models.build("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.normal_()
    adapter.sync()
    assert any(not torch.equal(v, base[k]) for k, v in model.state_dict().items())
    adapter.remove()
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    shira_fx.prepare(model, shira_fx.ShiraConfig(), progress=False)  # can be prepared again


def test_the_masked_gradient_plan_follows_the_module_to_another_device():
    """The plan is a plain attribute (not a buffer): `.to()` moves it with the indices."""
    model = tiny_models.build("mlp")
    shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.3, mask="struct"), progress=False)
    model.to("meta")
    assert model[0].shira_indices.is_meta
    assert all(t.is_meta for t in structure_of(model[0]))
