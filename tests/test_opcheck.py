"""Every `shira_fx::` op passes `torch.library.opcheck` (schema, fake kernel against the real
one, autograd registration, AOT dispatch with dynamic shapes) over a few shapes and dtypes,
and its fake kernel refuses operands that do not fit, naming the operand."""

from __future__ import annotations

import pytest
import torch

from shira_fx import ops, quantized  # noqa: F401  (ops registers torch.ops.shira_fx)
from shira_fx.kernels.structure import mask_structure, no_structure

OPS = torch.ops.shira_fx
G = torch.Generator().manual_seed(0)


def _indices(numel: int, nnz: int, dtype=torch.int32) -> torch.Tensor:
    return torch.randperm(numel, generator=G)[:nnz].sort().values.to(dtype)


def _rand(*shape, dtype=torch.float32, grad=False) -> torch.Tensor:
    return torch.randn(*shape, generator=G).to(dtype).requires_grad_(grad)


def _sparse_linear_cases():
    for dtype, transposed, lead, structured in [(torch.float32, False, (5,), False),
                                                (torch.float32, True, (2, 3), True),
                                                (torch.bfloat16, False, (2, 4), True)]:
        out_f, in_f = 6, 8
        shape = (in_f, out_f) if transposed else (out_f, in_f)
        idx = _indices(out_f * in_f, 12) if not structured else torch.arange(shape[1], 3 * shape[1],
                                                                              dtype=torch.int32)
        structure = mask_structure(idx, *shape, min_nnz=0) or no_structure(idx)
        yield (_rand(*lead, in_f, dtype=dtype, grad=True), _rand(*shape), _rand(out_f, grad=True),
               _rand(idx.numel(), grad=True), idx, transposed, structure)


def _masked_grad_cases():
    for dtype, structured in [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)]:
        a, b = _rand(7, 5, dtype=dtype), _rand(7, 9, dtype=dtype)
        idx = _indices(45, 10) if not structured else torch.arange(9, 27, dtype=torch.int64)
        yield a, b, idx, 9, mask_structure(idx, 5, 9, min_nnz=0) if structured else []


def _scatter_cases():
    for dtype in (torch.float32, torch.bfloat16):
        weights = [_rand(4, 6, dtype=dtype), _rand(3, 5, dtype=dtype)]
        indices = [_indices(24, 5), _indices(15, 4, torch.int64)]
        base = [w.view(-1)[i.long()].clone() for w, i in zip(weights, indices, strict=True)]
        yield weights, indices, base, [_rand(5), _rand(4)], 0.5
        yield [w.clone() for w in weights], indices, base, [], 1.0


def _side_cases(grad: bool):
    """side_linear's (x, ...) with grad; side_grad_x's (grad_y, ...) without (S is (5, 8))."""
    for dtype, lead in [(torch.float32, (6,)), (torch.bfloat16, (2, 3))]:
        idx = _indices(40, 9)
        yield _rand(*lead, 8 if grad else 5, dtype=dtype, grad=grad), _rand(9, grad=grad), idx, 5, 8


def _request_cases():
    for transposed in (False, True):
        out_f, in_f = 6, 4
        weight = _rand(*((in_f, out_f) if transposed else (out_f, in_f)))
        parts = [_indices(24, 5), _indices(24, 7)]
        indices, values = torch.cat(parts), _rand(12)
        offsets = torch.tensor([0, 5, 12])
        yield (_rand(3, 2, in_f), weight, _rand(out_f), torch.tensor([1, -1, 0]), indices, values, offsets,
               transposed)


def _segmented_cases():
    for transposed in (False, True):
        parts = [_indices(24, 5), _indices(24, 7)]
        yield (_rand(6, 4), torch.tensor([0, 2, 2, 6]), torch.tensor([1, -1, 0]), torch.cat(parts), _rand(12),
               torch.tensor([0, 5, 12]), 6, 4, transposed)


def _conv_cases():
    for dtype, d, groups in [(torch.float32, 2, 1), (torch.float32, 1, 2), (torch.bfloat16, 2, 2)]:
        w = _rand(6, 4 // groups, *([3] * d))
        idx = _indices(w.numel(), 9)
        x = _rand(2, 4, *([7] * d), dtype=dtype, grad=True)
        yield x, w, _rand(6, grad=True), _rand(9, grad=True), idx, [2] * d, [1] * d, [1] * d, groups


def _masked_conv_grad_cases():
    for d, groups, dilation in [(2, 1, 1), (1, 2, 2)]:
        shape = [6, 4 // groups, *([3] * d)]
        x = _rand(2, 4, *([8] * d))
        y = (torch.nn.functional.conv1d if d == 1 else torch.nn.functional.conv2d)(
            x, torch.zeros(shape), None, 1, 1, dilation, groups)
        idx = _indices(torch.Size(shape).numel(), 11)
        yield x, _rand(*y.shape), idx, shape, [1] * d, [1] * d, [dilation] * d, groups


def _dequantizing_layers() -> list[torch.nn.Module]:
    """A small (8, 16) layer of every kind that computes by dequantizing: bitsandbytes NF4 with
    nested absmax, FP4 without, int8 (in training mode), torchao NF4 and int8 weight-only."""
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    layers = []
    for quant_type, nested in (("nf4", True), ("fp4", False)):
        layer = bnb.nn.Linear4bit(16, 8, quant_type=quant_type, compress_statistics=nested)
        layer.weight = bnb.nn.Params4bit(_rand(8, 16), requires_grad=False, quant_type=quant_type,
                                         compress_statistics=nested)
        layers.append(layer.to("cpu"))
    int8 = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)
    int8.weight = bnb.nn.Int8Params(_rand(8, 16), requires_grad=False, has_fp16_weights=False)
    layers.append(int8.to("cpu").train())
    nf4 = torch.nn.Linear(16, 8)
    nf4.weight = torch.nn.Parameter(to_nf4(nf4.weight.detach(), 16, 4), requires_grad=False)
    int8_only = torch.nn.Sequential(torch.nn.Linear(16, 8))
    quantize_(int8_only, Int8WeightOnlyConfig())
    return [*layers, nf4, int8_only[0]]


def _dequantized_cases(grad: bool):
    """dequantized_linear's (x, packed, bias, values, indices, kind, meta, structure) with grad;
    dequantized_grad_x's (grad_y, packed, values, indices, kind, meta) without."""
    for i, layer in enumerate(_dequantizing_layers()):
        dtype, lead = [(torch.float32, (5,)), (torch.bfloat16, (2, 3))][i % 2]
        plan = quantized.dequantizing(layer, torch.zeros(1, 16))
        assert plan is not None, type(layer)
        idx = _indices(128, 11)
        if not grad:
            yield _rand(6, 8, dtype=dtype), plan.packed, _rand(11), idx, plan.kind, plan.meta
            continue
        x, bias, values = _rand(*lead, 16, dtype=dtype, grad=True), _rand(8, grad=True), _rand(11, grad=True)
        structure = mask_structure(idx, 8, 16, min_nnz=0) or no_structure(idx)
        yield x, plan.packed, bias, values, idx, plan.kind, plan.meta, structure


CASES = {
    "dequantized_linear": lambda: _dequantized_cases(grad=True),
    "dequantized_grad_x": lambda: _dequantized_cases(grad=False),
    "sparse_conv": _conv_cases,
    "masked_conv_grad": _masked_conv_grad_cases,
    "sparse_linear": _sparse_linear_cases,
    "masked_grad": _masked_grad_cases,
    "scatter_": _scatter_cases,
    "side_linear": lambda: _side_cases(grad=True),
    "side_grad_x": lambda: _side_cases(grad=False),
    "request_linear": _request_cases,
    "side_segmented": _segmented_cases,
}


def test_every_op_is_checked():
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("shira_fx::")}
    assert registered == set(CASES), "an op without opcheck cases (or cases for no op)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    op = getattr(OPS, name).default
    for args in CASES[name]():
        torch.library.opcheck(op, args)


def _fake(fn, *args):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        return fn(*args)


def test_fake_kernels_name_the_operand_that_does_not_fit():
    x, w, idx = torch.randn(3, 8), torch.randn(6, 8), _indices(48, 5)
    vals = torch.randn(5)
    with pytest.raises(RuntimeError, match=r"sparse_linear: x must end in the weight's 8 input features"):
        _fake(OPS.sparse_linear, torch.randn(3, 7), w, None, vals, idx, False, [])
    with pytest.raises(RuntimeError, match=r"sparse_linear: values \(4\) and indices \(5\)"):
        _fake(OPS.sparse_linear, x, w, None, torch.randn(4), idx, False, [])
    with pytest.raises(RuntimeError, match=r"sparse_linear: bias must have shape \(6,\)"):
        _fake(OPS.sparse_linear, x, w, torch.randn(8), vals, idx, False, [])
    with pytest.raises(RuntimeError, match=r"masked_grad: a and b must share T"):
        _fake(OPS.masked_grad, torch.randn(3, 6), torch.randn(4, 8), idx, 8, [])
    with pytest.raises(RuntimeError, match=r"masked_grad: indices must be 1-D int32/int64"):
        _fake(OPS.masked_grad, torch.randn(3, 6), torch.randn(3, 8), idx.float(), 8, [])
    with pytest.raises(RuntimeError, match=r"side_linear: x must end in in_features = 8"):
        _fake(OPS.side_linear, torch.randn(3, 5), vals, idx, 6, 8)
    with pytest.raises(RuntimeError, match=r"side_grad_x: grad_y must end in out_features = 6"):
        _fake(OPS.side_grad_x, torch.randn(3, 5), vals, idx, 6, 8)
    with pytest.raises(RuntimeError, match=r"scatter_: base\[0\] must be a float tensor of shape \(5,\)"):
        _fake(OPS.scatter_, [w], [idx], [torch.zeros(4)], [], 1.0)
    with pytest.raises(RuntimeError, match=r"request_linear: row_adapters must be 1-D ints, one per"):
        _fake(OPS.request_linear, torch.randn(2, 3, 8), w, None, torch.tensor([0]), idx, vals,
              torch.tensor([0, 5]), False)
    with pytest.raises(RuntimeError, match=r"sparse_conv: x has 3 channels; the weight \(6, 4, 3, 3\)"):
        _fake(OPS.sparse_conv, torch.randn(2, 3, 7, 7), torch.randn(6, 4, 3, 3), None, vals, idx, [1, 1],
              [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"masked_conv_grad: grad_y has 5 channels, the weight 6 outputs"):
        _fake(OPS.masked_conv_grad, torch.randn(2, 4, 7, 7), torch.randn(2, 5, 7, 7), idx, [6, 4, 3, 3],
              [1, 1], [1, 1], [1, 1], 1)
    packed = [torch.zeros(64, 1, dtype=torch.uint8), torch.ones(2)]
    with pytest.raises(RuntimeError, match=r"dequantized_linear: kind must be one of .*found 'bnb_nf8'"):
        _fake(OPS.dequantized_linear, x, packed, None, vals, idx, "bnb_nf8", [6, 8, 64], [])
    with pytest.raises(RuntimeError, match=r"dequantized_linear: a bnb_nf4 weight takes \(2, 5\) packed"):
        _fake(OPS.dequantized_linear, x, packed[:1], None, vals, idx, "bnb_nf4", [6, 8, 64], [])
    with pytest.raises(RuntimeError, match=r"dequantized_linear: x must end in the weight's 16 input"):
        _fake(OPS.dequantized_linear, x, packed, None, vals, idx, "bnb_nf4", [6, 16, 64], [])
    with pytest.raises(RuntimeError, match=r"dequantized_grad_x: grad_y must be \(T, out_features = 6\)"):
        _fake(OPS.dequantized_grad_x, torch.randn(3, 8), packed, vals, idx, "bnb_nf4", [6, 8, 64])
    with pytest.raises(RuntimeError, match=r"side_segmented: seg_starts must have one more entry"):
        _fake(OPS.side_segmented, torch.randn(4, 8), torch.tensor([0, 4]), torch.tensor([0, 0]), idx, vals,
              torch.tensor([0, 5]), 6, 8, False)
