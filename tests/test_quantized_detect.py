"""Quantized base layers (shira_fx/quantized.py): detection by type, logical shapes, dequantized
weights against each library's own dequantize, and the layer's own forward; tests of a library
skip when it is not installed. The quantized layers run on CPU."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shira_fx import quantized
from shira_fx.kernels.side import side_forward
from shira_fx.layer import own_forward as base_forward
from shira_fx.quantized import (
    dequantized_weight,
    is_quantized_linear,
    logical_shape,
    quantized_kind,
    unknown_quantized,
)

ROOT = Path(__file__).resolve().parent.parent
# bitsandbytes' 8-bit matmul quantizes each row of activations to int8 as well (LLM.int8())
INT8_RTOL = 3e-2


def _check_base_forward(layer: nn.Module, x: torch.Tensor, rtol: float) -> None:
    """base_forward is the layer's own output, also after an instance-level forward override,
    and it agrees with the dequantized weight up to the library's activation rounding."""
    own = layer(x)
    assert torch.equal(base_forward(layer, x), own)
    layer.forward = lambda x: torch.zeros(())  # what a caller rewiring the layer would do
    try:
        assert torch.equal(base_forward(layer, x), own)
    finally:
        del layer.forward
    w = dequantized_weight(layer).float()
    bias = None if layer.bias is None else layer.bias.float()
    expected = F.linear(x.float(), w, bias)
    magnitude = F.linear(x.float().abs(), w.abs(), None if bias is None else bias.abs())
    assert torch.all((own.float() - expected).abs() <= rtol * magnitude + 1e-6)


def _check_side_path(layer: nn.Module, x: torch.Tensor, rtol: float) -> None:
    """The use this module exists for: base_forward plus the sparse side product equals the
    dense product with the dequantized weight plus the delta."""
    out_f, in_f = logical_shape(layer)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(out_f * in_f, generator=g)[: out_f * in_f // 50].sort().values.int()
    vals = torch.randn(idx.shape[0], generator=g) * 0.1
    y = base_forward(layer, x) + side_forward(x, idx, vals, out_f, in_f)
    w = dequantized_weight(layer).float().flatten().clone()
    w[idx.long()] += vals
    bias = None if layer.bias is None else layer.bias.float()
    expected = F.linear(x.float(), w.view(out_f, in_f), bias)
    magnitude = F.linear(x.float().abs(), w.view(out_f, in_f).abs(), None if bias is None else bias.abs())
    assert torch.all((y.float() - expected).abs() <= rtol * magnitude + 1e-6)


# --------------------------------------------------------------------------------------------
# without any quantization library


def test_the_module_imports_no_quantization_library_at_top_level():
    tree = ast.parse((ROOT / "shira_fx" / "quantized.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
    assert not {n for n in names if n.split(".")[0] in ("bitsandbytes", "torchao")}


@pytest.mark.slow
def test_the_module_works_where_no_quantization_library_is_installed():
    code = (
        "import sys\n"
        "sys.modules['bitsandbytes'] = sys.modules['torchao'] = None  # import fails\n"
        "import torch\n"
        "from shira_fx import quantized as q\n"
        "layer = torch.nn.Linear(4, 3)\n"
        "assert not q.is_quantized_linear(layer) and q.quantized_kind(layer) is None\n"
        "assert q.unknown_quantized(layer) is None and q.logical_shape(layer) == (3, 4)\n"
        "from shira_fx.layer import own_forward\n"
        "assert torch.equal(own_forward(layer, torch.ones(2, 4)), layer(torch.ones(2, 4)))\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_plain_float_layers_are_not_quantized():
    for layer in (nn.Linear(5, 3), nn.Linear(5, 3).to(torch.bfloat16), nn.Embedding(4, 2), nn.LayerNorm(3)):
        assert not is_quantized_linear(layer) and quantized_kind(layer) is None
        assert unknown_quantized(layer) is None
    assert logical_shape(nn.Linear(5, 3)) == (3, 5)


def test_unknown_quantized_layers_are_named():
    int8 = nn.Linear(4, 3)
    int8.weight = nn.Parameter(torch.zeros(3, 4, dtype=torch.int8), requires_grad=False)
    assert "nn.modules.linear.Linear: weight has dtype torch.int8" in unknown_quantized(int8)

    class Marked(torch.Tensor):
        pass

    marked = nn.Linear(4, 3)
    marked.weight = nn.Parameter(marked.weight.detach().as_subclass(Marked), requires_grad=False)
    assert "weight is a " in unknown_quantized(marked) and "Marked" in unknown_quantized(marked)

    class QuantLinear(nn.Module):  # GPTQ/AWQ style: packed int32 qweight, no float weight
        def __init__(self):
            super().__init__()
            self.register_buffer("qweight", torch.zeros(2, 3, dtype=torch.int32))

    assert "packed in `qweight`" in unknown_quantized(QuantLinear())
    for layer in (int8, marked, QuantLinear()):
        assert not is_quantized_linear(layer)


def test_known_only_functions_refuse_other_layers_by_name():
    with pytest.raises(ValueError, match=r"found torch.nn.modules.linear.Linear"):
        dequantized_weight(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"2-D \(out, in\) weight, found .*LayerNorm with a weight of shape"):
        logical_shape(nn.LayerNorm(3))


# --------------------------------------------------------------------------------------------
# bitsandbytes


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes")


def _bnb_linear(bnb, kind: str, bias: bool = True) -> nn.Module:
    """A bitsandbytes layer quantized on CPU from a float Linear (what from_pretrained does per
    layer)."""
    torch.manual_seed(0)
    dense = nn.Linear(96, 40, bias=bias)
    if kind == "bnb_int8":
        layer = bnb.nn.Linear8bitLt(96, 40, bias=bias, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(96, 40, bias=bias, quant_type=kind[4:], compute_dtype=torch.float32)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # bitsandbytes quantizes when the weight moves to a device
    layer.dense = dense.weight.detach()  # the original weight, for the tests
    return layer


@pytest.mark.parametrize("kind", ["bnb_nf4", "bnb_fp4", "bnb_int8"])
def test_bnb_layers(bnb, kind):
    import bitsandbytes.functional as bnb_f

    layer = _bnb_linear(bnb, kind)
    assert layer.weight.dtype in (torch.uint8, torch.int8)  # packed: not a float weight
    assert is_quantized_linear(layer) and quantized_kind(layer) == kind
    assert unknown_quantized(layer) is None
    assert logical_shape(layer) == (40, 96)
    w = dequantized_weight(layer)
    if kind == "bnb_int8":
        own = bnb_f.int8_vectorwise_dequant(layer.weight.CB, layer.weight.SCB)
    else:
        own = bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert w.shape == (40, 96) and torch.equal(w, own)
    layer(torch.ones(1, 96))  # bitsandbytes' 8-bit forward moves the row scales to its state
    assert torch.equal(dequantized_weight(layer), own)
    assert (w.float() - layer.dense).abs().max() <= 0.2 * layer.dense.abs().max()
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(1))
    rtol = INT8_RTOL if kind == "bnb_int8" else 1e-5
    _check_base_forward(layer, x, rtol)
    _check_side_path(layer, x, rtol)


@pytest.mark.parametrize("kind", ["bnb_nf4", "bnb_int8"])
def test_bnb_base_forward_backpropagates_to_the_input_on_cpu(bnb, kind):
    layer = _bnb_linear(bnb, kind)
    x = torch.randn(3, 96, requires_grad=True)
    base_forward(layer, x).sum().backward()
    w = dequantized_weight(layer).float()
    assert torch.allclose(x.grad, w.sum(0).expand(3, -1), rtol=2e-2, atol=1e-3)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.tiny_models import build

    model = build("llama")
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path, {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bnb_nf4", "bnb_fp4", "bnb_int8"])
def test_transformers_bnb_models_are_detected_layer_by_layer(bnb, tiny_checkpoint, kind):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path, shapes = tiny_checkpoint
    config = (BitsAndBytesConfig(load_in_8bit=True) if kind == "bnb_int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind[4:],
                                 bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    found = {n: quantized_kind(m) for n, m in model.named_modules()}
    linears = {n for n in shapes if n != "lm_head"}  # transformers keeps the head in float
    assert {n for n, k in found.items() if k is not None} == linears
    assert all(found[n] == kind for n in linears)
    assert all(unknown_quantized(m) is None for m in model.modules())
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    for name in linears:
        layer = model.get_submodule(name)
        # as shira_fx runs them: bitsandbytes' CPU repack (AVX512-BF16 CPUs, eval mode) fails
        # on layers narrower than a quantization block, and changes what the layer computes
        quantized.settle_layout(layer)
        assert logical_shape(layer) == tuple(shapes[name])
        _check_base_forward(layer, x if shapes[name][1] == 32 else torch.randn(4, shapes[name][1]),
                            INT8_RTOL if kind == "bnb_int8" else 1e-5)


# --------------------------------------------------------------------------------------------
# torchao


@pytest.fixture(scope="module")
def torchao_quantization():
    pytest.importorskip("torchao")
    import torchao.quantization

    return torchao.quantization


def test_torchao_nf4(torchao_quantization):
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

    torch.manual_seed(0)
    layer = nn.Linear(256, 128)  # NF4 needs a multiple of 64 * 256 elements
    dense = layer.weight.detach().clone()
    layer.weight = nn.Parameter(to_nf4(dense), requires_grad=False)
    assert is_quantized_linear(layer) and quantized_kind(layer) == "torchao_nf4"
    assert unknown_quantized(layer) is None and logical_shape(layer) == (128, 256)
    w = dequantized_weight(layer)
    assert torch.equal(w, layer.weight.get_original_weight())
    assert (w - dense).abs().max() <= 0.2 * dense.abs().max()
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(base_forward(layer, x), linear_nf4(x, layer.weight) + layer.bias)
    _check_base_forward(layer, x, 1e-5)
    _check_side_path(layer, x, 1e-5)


def test_torchao_int8_weight_only(torchao_quantization):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16, bias=False))
    dense = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    torchao_quantization.quantize_(model, torchao_quantization.Int8WeightOnlyConfig())
    for layer, original in zip((model[0], model[2]), dense, strict=True):
        assert type(layer) is nn.Linear and quantized_kind(layer) == "torchao_int8"
        assert unknown_quantized(layer) is None
        assert logical_shape(layer) == tuple(original.shape)
        w = dequantized_weight(layer)
        assert torch.equal(w, layer.weight.dequantize())
        assert (w - original).abs().max() <= 0.01 * original.abs().max()
        x = torch.randn(5, original.shape[1], generator=torch.Generator().manual_seed(1))
        _check_base_forward(layer, x, 1e-5)
        _check_side_path(layer, x, 1e-5)
    assert not is_quantized_linear(model[1])


def test_torchao_int4_is_detected(torchao_quantization):
    """Int4WeightOnlyConfig cannot quantize on CPU with torchao 0.18 (its kernels are GPU ones),
    so the tensor is built directly: detection and shape need no kernel."""
    weight = torchao_quantization.Int4Tensor(
        qdata=torch.zeros(128, 128, dtype=torch.int8), scale=torch.ones(2, 128, dtype=torch.bfloat16),
        zero_point=torch.zeros(2, 128, dtype=torch.bfloat16), block_size=[1, 128],
        shape=torch.Size([128, 256]),
    )
    layer = nn.Linear(256, 128, bias=False).to(torch.bfloat16)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    assert quantized_kind(layer) == "torchao_int4" and unknown_quantized(layer) is None
    assert logical_shape(layer) == (128, 256)


def test_dequantize_falls_back_to_a_probe_through_the_layer(torchao_quantization, monkeypatch):
    """An Int4 weight (whose packings have no dequantize on every device) is read through its
    own linear: checked on an Int8 layer taken for one, against its own dequantize."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24))
    torchao_quantization.quantize_(model, torchao_quantization.Int8WeightOnlyConfig())
    layer = model[0]
    expected = layer.weight.dequantize()
    monkeypatch.setattr(quantized, "_PROBE_ROWS", 16)  # three blocks of the identity

    monkeypatch.setattr(quantized, "quantized_kind", lambda module: "torchao_int4")
    w = dequantized_weight(layer)
    assert w.shape == (24, 40)
    assert torch.allclose(w, expected, rtol=1e-6, atol=1e-7)
