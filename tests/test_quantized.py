"""SHiRA on quantized bases (bitsandbytes 4-bit as transformers loads it, in both of its layouts,
bitsandbytes int8, torchao NF4 and int8). A layer that computes by dequantizing runs one GEMM
each way on its dequantized weight with the delta written in: its forward, input gradient and
values' gradient equal a dense model holding the dequantized weights with the delta at the mask,
and it holds nothing weight-sized for backward. Other layers carry the adapter beside them. The
packed weights never change, a saved adapter served from a bank reproduces the trained model,
and deactivate gives the base exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import shira_fx
from shira_fx import ShiraConfig
from shira_fx import quantized as q
from shira_fx.memory import resident_state, saved_tensor_bytes
from shira_fx.quantized import dequantized_weight, quantized_kind
from tests.conftest import budget

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
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


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


# -- one GEMM per linear, layer by layer ----------------------------------------------------------

OUT, IN = 32, 128  # 4096 elements: whole blocks for every kind's quantizer


def _bnb_4bit_layer(quant_type: str, nested: bool):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(IN, OUT, quant_type=quant_type, compress_statistics=nested,
                              compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(OUT, IN) * 0.1, requires_grad=False, quant_type=quant_type,
                                     compress_statistics=nested)
    return layer.to("cpu")


def _layer(kind: str) -> torch.nn.Module:
    """One (OUT, IN) quantized linear with a bias, of each kind that computes by dequantizing;
    "bnb_nf4_cpu_packed" is bitsandbytes NF4 converted to the CPU-packed layout (as an eval forward
    on an AVX512-BF16 CPU converts it), which prepare settles back."""
    torch.manual_seed(0)
    if kind in ("bnb_nf4", "bnb_nf4_cpu_packed", "bnb_fp4"):
        layer = _bnb_4bit_layer(kind.split("_")[1], nested=kind != "bnb_fp4")
        if kind == "bnb_nf4_cpu_packed":
            import bitsandbytes.functional as bnb_f

            w = layer.weight
            w.data, _ = bnb_f._convert_weight_packed_for_cpu(w.data, w.quant_state)
            assert q.is_cpu_packed(layer)
        return layer
    if kind == "bnb_int8":
        bnb = pytest.importorskip("bitsandbytes")
        layer = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False)
        weight = torch.randn(OUT, IN) * 0.1
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        return layer.to("cpu").train()
    pytest.importorskip("torchao")
    layer = torch.nn.Linear(IN, OUT)
    if kind == "torchao_nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        layer.weight = torch.nn.Parameter(to_nf4(layer.weight.detach(), 64, 64), requires_grad=False)
        return layer
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    holder = torch.nn.Sequential(layer)
    quantize_(holder, Int8WeightOnlyConfig())
    return holder[0]


ONE_GEMM_KINDS = ["bnb_nf4", "bnb_nf4_cpu_packed", "bnb_fp4", "bnb_int8", "torchao_nf4", "torchao_int8"]


class _Ops(TorchDispatchMode):
    """The ops dispatched at the top level (inside an op, its own calls are not seen)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _prepared(kind: str, density: float = 0.1):
    """(model, its adapter) for one layer of `kind`, with random nonzero values."""
    model = torch.nn.Sequential(_layer(kind))
    adapter = shira_fx.prepare(model, ShiraConfig(density=density), progress=False)
    (layer,) = adapter.layers.values()
    with torch.no_grad():
        layer.values.copy_(torch.randn(layer.values.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model, adapter, layer


def _dense_reference(module, layer, x: torch.Tensor, grad_y: torch.Tensor):
    """(y, grad_x, values' gradient) of the dense linear holding the dequantized weight with the
    delta at the mask, in fp32."""
    weight = dequantized_weight(module).float().clone()
    weight.view(-1)[layer.indices.long()] += layer.values.detach().float()
    weight.requires_grad_(True)
    x = x.detach().float().requires_grad_(True)
    bias = None if module.bias is None else module.bias.detach().float()
    y = torch.nn.functional.linear(x, weight, bias)
    y.backward(grad_y.float())
    return y.detach(), x.grad, weight.grad.view(-1)[layer.indices.long()]


@pytest.mark.parametrize("mode", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ONE_GEMM_KINDS)
def test_one_gemm_equals_the_dequantized_dense_linear_with_the_delta(kind, mode):
    """Forward, grad_x and the values' gradient of a layer that computes by dequantizing equal
    the dense fp32 linear on its dequantized weight with the delta at the mask, through one op
    each way (no side product, no library matmul beside it), eager and compiled."""
    torch._dynamo.reset()
    model, adapter, layer = _prepared(kind)
    module = model[0]
    assert not q.is_cpu_packed(module)  # prepare settled the layout
    x = torch.randn(2, 3, IN, generator=torch.Generator().manual_seed(2), requires_grad=True)
    grad_y = torch.randn(2, 3, OUT, generator=torch.Generator().manual_seed(3))
    want_y, want_gx, want_gv = _dense_reference(module, layer, x, grad_y)
    if mode == "eager":
        seen = _Ops()
        with seen:
            y = model(x)
            y.backward(grad_y)
        assert {"shira_fx.dequantized_linear", "shira_fx.dequantized_grad_x"} <= seen.names, seen.names
        assert not {n for n in seen.names if "side" in n or n.startswith("bitsandbytes")}, seen.names
    else:  # (Dynamo does not compile under a dispatch mode: the report says what the graph holds)
        backend = shira_fx.backend(inner=mode)
        y = torch.compile(model, backend=backend)(x)
        y.backward(grad_y)
        (report,) = backend.reports
        assert report.dequantized == list(adapter.layers), report.summary()
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, want_gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.values.grad, want_gv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ONE_GEMM_KINDS)
def test_one_gemm_holds_nothing_weight_sized_for_backward(kind):
    """What autograd saves beyond the model's resident state is the layer's input alone: no
    dequantized weight, no dense delta (backward rebuilds the transient)."""
    model, _, _ = _prepared(kind)
    x = torch.randn(2, 3, IN, requires_grad=True)
    held, y = saved_tensor_bytes(lambda: model(x), exclude=resident_state(model))
    assert held <= x.numel() * x.element_size() < OUT * IN * 4, held
    y.sum().backward()


def test_the_packed_weight_is_only_read_and_training_steps_change_the_output():
    model, adapter, layer = _prepared("bnb_nf4")
    module = model[0]
    before = module.weight.detach().clone(), dequantized_weight(module).clone()
    x = torch.randn(4, IN)
    with torch.no_grad():
        y0 = model(x)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.5)
    for _ in range(2):
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert not torch.allclose(model(x), y0)
    assert torch.equal(module.weight.detach(), before[0])
    assert torch.equal(dequantized_weight(module), before[1])


@pytest.mark.fuzz
@given(out_f=st.integers(1, 48), in_f=st.sampled_from([2, 8, 30, 64, 96]), rows=st.integers(1, 7),
       density=st.floats(0.01, 0.6), kind=st.sampled_from(["bnb_nf4", "bnb_fp4", "torchao_int8"]))
@settings(max_examples=budget(100))
def test_one_gemm_matches_the_dense_reference_over_shapes(out_f, in_f, rows, density, kind):
    """Any (out, in) the quantizer takes, any number of tokens and any density: the one-GEMM
    forward and both gradients equal the dense reference."""
    global OUT, IN
    saved = OUT, IN
    OUT, IN = out_f, in_f
    try:
        model, _, layer = _prepared(kind, density)
    finally:
        OUT, IN = saved
    module = model[0]
    x = torch.randn(rows, in_f, requires_grad=True)
    grad_y = torch.randn(rows, out_f)
    want_y, want_gx, want_gv = _dense_reference(module, layer, x, grad_y)
    y = model(x)
    y.backward(grad_y)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, want_gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.values.grad, want_gv, rtol=1e-5, atol=1e-5)


def test_layers_that_compute_without_dequantizing_keep_the_side_product():
    """bitsandbytes int8 in eval mode multiplies int8 inputs (MatMul8bitLt) and a CPU-packed 4-bit
    weight computes in bf16: no dequantized GEMM, so the adapter rides beside the layer's own
    forward, which it leaves exactly as it was plus `x @ S.T`."""
    int8 = _layer("bnb_int8").eval()
    x = torch.randn(3, IN)
    assert q.dequantizing(int8, x) is None and q.dequantizing(int8.train(), x) is not None
    assert q.dequantizing(_layer("bnb_nf4_cpu_packed"), x) is None
    model, _, layer = _prepared("bnb_int8")
    model.eval()
    seen = _Ops()
    with torch.no_grad():
        own = q.dequantizing(model[0], x)
        base = type(model[0]).__mro__[1].forward(model[0], x)
        with seen:
            y = model(x)
    assert own is None and "shira_fx.side_linear" in seen.names, seen.names
    delta = torch.zeros(OUT * IN)
    delta[layer.indices.long()] = layer.values.detach()
    torch.testing.assert_close(y, base + x @ delta.view(OUT, IN).T, rtol=1e-5, atol=1e-5)
