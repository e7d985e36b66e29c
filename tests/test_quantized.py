"""SHiRA on quantized bases: the adapter rides beside the packed weights (bitsandbytes 4-bit as
transformers loads it, torchao NF4). The values' gradient equals the masked gradient of an
fp32 model holding the dequantized weights, the packed weights never change, a saved adapter
served from a bank reproduces the trained model, and deactivate gives the base exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import shira_fx
from shira_fx import ShiraConfig
from shira_fx import quantized as q
from shira_fx.quantized import dequantized_weight, quantized_kind

transformers = pytest.importorskip("transformers")
SIZE = dict(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)


def _fp32_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZE))


def bnb_4bit(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    folder = tmp_path_factory.mktemp("fp32")
    _fp32_llama().save_pretrained(folder)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=torch.float32)
    return transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=q, device_map="cpu")


def torchao_nf4(tmp_path_factory):
    pytest.importorskip("torchao")
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    model = _fp32_llama()
    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(to_nf4(module.weight.detach()), requires_grad=False)
    return model


BASES = {"bnb_nf4": bnb_4bit, "torchao_nf4": torchao_nf4}


@pytest.fixture(params=list(BASES))
def quantized_model(request, tmp_path_factory):
    return BASES[request.param](tmp_path_factory)


def _batch(seed: int = 0) -> dict:
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _computed_weights(model) -> dict:
    """What every layer computes with: a quantized layer's dequantized weight (in whichever
    layout bitsandbytes holds it), any other weight as it is."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if "weight" in n}
    for name, module in model.named_modules():
        if quantized_kind(module) is not None:
            out[f"{name}.weight"] = dequantized_weight(module).clone()
    return out


def _repack_for_cpu(model) -> int:
    """bitsandbytes' own conversion to its CPU-packed 4-bit layout, as Linear4bit.forward does
    it on AVX512-BF16 CPUs: forced, so every machine tests that layout; how many it packed."""
    import bitsandbytes.functional as bnb_f

    packed = 0
    for module in model.modules():
        if quantized_kind(module) in ("bnb_nf4", "bnb_fp4"):
            w = module.weight
            w.data, _ = bnb_f._convert_weight_packed_for_cpu(w.data, w.quant_state)
            packed += 1
    return packed


def _dequantized_twin(model, adapter):
    """An fp32 model holding the quantized model's dequantized weights (the oracle)."""
    twin = _fp32_llama()
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, module in twin.named_modules():
            if name in mods and quantized_kind(mods[name]) is not None:
                module.weight.copy_(dequantized_weight(mods[name]).float())
    return twin


@pytest.mark.parametrize("mode", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow)])
def test_the_values_gradient_is_the_dequantized_models_masked_gradient(quantized_model, mode):
    torch._dynamo.reset()
    model = quantized_model
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.05), progress=False)
    assert {la.quantized for la in adapter.layers.values()} <= {"bnb_nf4", "torchao_nf4"}
    assert len(adapter.layers) == 7
    twin = _dequantized_twin(model, adapter)
    for p in twin.parameters():
        p.requires_grad_(True)
    twin(**_batch()).loss.backward()
    run = model if mode == "eager" else torch.compile(model, backend=shira_fx.backend(inner=mode))
    counters.clear()
    run(**_batch()).loss.backward()
    if mode != "eager":  # one frame, compiled whole (a failing backend makes Dynamo split it)
        assert counters["frames"]["total"] == counters["frames"]["ok"] == 1, dict(counters["frames"])
    twin_modules = dict(twin.named_modules())
    for name, layer in adapter.layers.items():
        want = twin_modules[name].weight.grad.view(-1)[layer.indices.long()]
        got = layer.values.grad
        assert got is not None, name
        assert float(torch.nn.functional.cosine_similarity(got, want, dim=0)) >= 0.99, name


def test_training_leaves_the_packed_weights_bit_identical_and_serves_from_a_bank(tmp_path,
                                                                                 tmp_path_factory):
    """A model from from_pretrained starts in eval mode, where bitsandbytes repacks its 4-bit
    weights on AVX512-BF16 CPUs: prepare and the bank settle the layout first, so what each
    layer computes with never changes."""
    pytest.importorskip("bitsandbytes")
    factory = tmp_path_factory
    model = bnb_4bit(factory)
    before = _computed_weights(model)
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.05), progress=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # exactly the values train
    losses = []
    for i in range(6):
        loss = model(**_batch(i % 2)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in _computed_weights(model).items():
        assert torch.equal(p, before[name]), f"{name}: a packed weight changed"
    ids = _batch(5)["input_ids"]
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    adapter.save(tmp_path / "q.safetensors")

    served = bnb_4bit(factory)
    bank = shira_fx.AdapterBank(served)
    with torch.no_grad():
        base_out = served(input_ids=ids).logits
    bank.load("q", tmp_path / "q.safetensors")
    bank.activate("q")
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
    bank.deactivate()
    with torch.no_grad():
        assert torch.equal(served(input_ids=ids).logits, base_out)
    dense = shira_fx.export_dense(copy.deepcopy(model), dtype=torch.float32)
    assert not any(quantized_kind(m) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)


def test_an_unknown_quantized_layer_is_refused_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    model[0].weight = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(shira_fx.ShiraConfigError, match="'0'"):
        shira_fx.prepare(model, ShiraConfig(density=0.5), progress=False)


def test_dequantized_weight_reads_the_cpu_packed_layout_as_the_layer_computes(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_f

    model = bnb_4bit(tmp_path_factory)
    layer = model.model.layers[0].mlp.up_proj
    standard = dequantized_weight(layer).clone()
    assert _repack_for_cpu(model) == 7
    assert layer.weight.data.shape == (256, 64)  # (N, K / 2): the packed layout
    packed = dequantized_weight(layer)
    assert layer.weight.data.shape == (256, 64)  # read on copies: the layer stays packed
    # the repack rounds the blocks' absmax to bf16: the same weight up to that rounding
    torch.testing.assert_close(packed, standard, rtol=2 ** -8, atol=0)
    assert not torch.equal(packed, standard)
    if bnb_f.has_avx512bf16():  # the packed kernel itself, where this CPU runs it (bf16 math)
        x = torch.randn(3, 128)
        with torch.no_grad():
            got, want = layer.eval()(x), x @ packed.T
        assert float((got - want).norm() / want.norm()) < 2 ** -7


@pytest.mark.parametrize("mode", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_cpu_packed_nf4_model_trains_compiled_and_serves(tmp_path_factory, mode):
    """Repacked before prepare (by bitsandbytes' own conversion, as an eval forward on an
    AVX512-BF16 CPU does): prepare settles the layout, the compiled step's values' gradient is
    the dequantized model's masked gradient, the weights computed with stay put, and a bank
    serves the trained adapter on the same base."""
    pytest.importorskip("bitsandbytes")
    torch._dynamo.reset()
    model = bnb_4bit(tmp_path_factory)
    _repack_for_cpu(model)
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.05), progress=False)
    assert not any(q.is_cpu_packed(m) for m in model.modules())
    before = _computed_weights(model)
    twin = _dequantized_twin(model, adapter)
    for p in twin.parameters():
        p.requires_grad_(True)
    twin(**_batch()).loss.backward()
    compiled = torch.compile(model, backend=shira_fx.backend(inner=mode))
    model.eval()  # inference mode, where bitsandbytes would repack again
    compiled(**_batch()).loss.backward()
    twin_modules = dict(twin.named_modules())
    for name, layer in adapter.layers.items():
        want = twin_modules[name].weight.grad.view(-1)[layer.indices.long()]
        torch.testing.assert_close(layer.values.grad, want, rtol=1e-4, atol=1e-6, msg=name)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    for i in range(3):
        opt.zero_grad()
        compiled(**_batch(i)).loss.backward()
        opt.step()
    with torch.no_grad():
        compiled(**_batch(9))  # an inference call: no repack
    for name, w in _computed_weights(model).items():
        assert torch.equal(w, before[name]), f"{name}: the weight computed with changed"
    ids = _batch(5)["input_ids"]
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    stored = adapter.snapshot()
    adapter.remove()
    bank = shira_fx.AdapterBank(model)
    bank.load("q", stored)
    bank.activate("q")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)


def test_a_bank_on_a_model_bitsandbytes_repacked_names_the_repack(tmp_path, tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    model = bnb_4bit(tmp_path_factory)
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.05), progress=False)
    with torch.no_grad():
        next(iter(adapter.layers.values())).values.fill_(0.01)
    adapter.save(tmp_path / "q.safetensors")
    served = bnb_4bit(tmp_path_factory)
    _repack_for_cpu(served)  # its first inference on an AVX512-BF16 CPU, before the bank
    bank = shira_fx.AdapterBank(served)
    assert not any(q.is_cpu_packed(m) for m in served.modules())
    with pytest.raises(shira_fx.ShiraAdapterError, match="repacked by bitsandbytes for AVX512-BF16"):
        bank.load("q", tmp_path / "q.safetensors")
    assert bank.names == []
    bank.load("q", tmp_path / "q.safetensors", check_base=False)
    bank.activate("q")
    ids = _batch(5)["input_ids"]
    twin = _dequantized_twin(served, None)
    name, layer = next(iter(adapter.layers.items()))
    with torch.no_grad():
        w = dict(twin.named_modules())[name].weight
        w.view(-1)[layer.indices.long()] += layer.values.float()
        torch.testing.assert_close(served(input_ids=ids).logits, twin(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
