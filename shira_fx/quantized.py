"""Quantized base layers: which ones shira_fx knows, their logical shape, their dequantized
weight and their own forward, without ever writing their packed weights (an adapter on such a
layer rides beside it, `y = layer(x) + x @ S.T`). Known kinds
(`quantized_kind`): `bnb_nf4`/`bnb_fp4` (bitsandbytes `Linear4bit`), `bnb_int8`
(`Linear8bitLt`), and an `nn.Linear` whose weight is a torchao `NF4Tensor` (`torchao_nf4`),
`Int8Tensor` (`torchao_int8`) or Int4 tensor (`torchao_int4`). Any other quantized-looking
layer is named by `unknown_quantized`, so callers refuse it by name. bitsandbytes and torchao
are optional and never imported here: a layer of theirs exists only once its library is
imported, so the checks look it up in `sys.modules`.

bitsandbytes stores a 4-bit weight in one of two layouts: the standard one ((n, 1) bytes), and
on CPUs with AVX512-BF16 a CPU-packed one that `Linear4bit.forward` converts to the first time
it runs in inference mode (its absmax rounded to bf16; its forward then has no backward).
`dequantized_weight` reads both; `settle_layout` puts a layer in the standard layout and keeps
it there, so a weight never changes shape under a compiled graph or a training step.

Which kinds compute by dequantizing (`dequantizing`: their adapter's delta is then written into
that dense transient and the layer runs one GEMM each way, `ops.dequantized_linear`), on this
CPU and in bitsandbytes 0.50 / torchao 0.18:

- `bnb_nf4`, `bnb_fp4` in the standard layout: `MatMul4Bit` runs `gemm_4bit`, on the CPU
  `dequantize_4bit` + `F.linear`, and its backward dequantizes again for grad_x (on CUDA the
  forward may take a fused kernel for small batches; dequantize + GEMM differs from it by
  rounding only). The CPU-packed layout computes in bf16 without dequantizing: side product.
- `bnb_int8` in training mode on the CPU/XPU: `MatMul8bitFp` dequantizes the int8 rows and runs
  `F.linear`. In eval mode (and on CUDA) `MatMul8bitLt` quantizes the input to int8 and multiplies
  integers, so dequantize + GEMM would change the base's own forward: side product.
- `torchao_nf4`: `linear_nf4` is `F.linear(x, W.to(x.dtype))` both ways.
- `torchao_int8` weight-only: `x @ int8(W).T` in x's dtype, then the row scales (rounding apart,
  the dequantized GEMM). With activation quantization (dynamic or static int8 activations, or an
  activation pre-scale) it multiplies integers: side product.
- `torchao_int4`: packed int4 kernels (tinygemm and friends), never a dense weight: side product.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# torchao tensor subclasses by kind (class names: the classes move between torchao releases)
_TORCHAO_KINDS = {
    "NF4Tensor": "torchao_nf4",
    "Int8Tensor": "torchao_int8",
    "Int4Tensor": "torchao_int4",
    "Int4PreshuffledTensor": "torchao_int4",
    "Int4PlainInt32Tensor": "torchao_int4",
    "Int4TilePackedTo4dTensor": "torchao_int4",
}
# attributes that hold a quantized weight in layers that have no float `weight`
# (GPTQ/AWQ/Marlin kernels: qweight; torch.ao quantized Linear: _packed_params; HQQ: W_q)
_PACKED_ATTRS = ("qweight", "_packed_params", "W_q", "packed_weight")
# rows of the identity sent through a layer at a time when its weight is read by a probe
_PROBE_ROWS = 1024
# the Linear4bit attribute that lets its forward repack the weight for AVX512-BF16 CPUs
_REPACKS = "support_avx512bf16_for_cpu"


def _bnb_module(module: nn.Module) -> tuple[Any, str] | None:
    """(bitsandbytes.nn, kind) for a bitsandbytes 4-bit or 8-bit linear, else None."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is None:
        return None
    if isinstance(module, bnb_nn.Linear4bit):
        w = module.weight
        state = getattr(w, "quant_state", None)
        quant_type = getattr(state, "quant_type", None) or getattr(w, "quant_type", "nf4")
        return bnb_nn, f"bnb_{quant_type}"
    if isinstance(module, bnb_nn.Linear8bitLt):
        return bnb_nn, "bnb_int8"
    return None


def _torchao_kind(weight: Any) -> str | None:
    """The kind of a torchao tensor subclass, by its class (or a base class) name."""
    if "torchao" not in sys.modules or not isinstance(weight, Tensor):
        return None
    for cls in type(weight).__mro__:
        if cls.__module__.startswith("torchao") and cls.__name__ in _TORCHAO_KINDS:
            return _TORCHAO_KINDS[cls.__name__]
    return None


def quantized_kind(module: nn.Module) -> str | None:
    """The kind of a quantized linear shira_fx knows (see the module's table), else None."""
    found = _bnb_module(module)
    if found is not None:
        return found[1]
    if isinstance(module, nn.Linear):
        return _torchao_kind(module.weight)
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether `module` is a quantized linear of a known kind (its delta then runs beside it)."""
    return quantized_kind(module) is not None


def _is_plain(weight: Tensor) -> bool:
    """A float weight held as a plain tensor or parameter (or a DTensor shard of one)."""
    if weight.dtype not in _FLOATS:
        return False
    cls = type(weight)
    if cls in (Tensor, nn.Parameter):
        return True
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(weight, dtensor.DTensor)


def unknown_quantized(module: nn.Module) -> str | None:
    """A description naming why `module` looks quantized when it is not a known kind, else None.

    Looks at the module's own `weight` (a non-float dtype, or a tensor subclass that is not a
    plain or distributed tensor) and at attributes that hold packed weights (`qweight`,
    `_packed_params`, ...). Known kinds and plain float layers give None.
    """
    if is_quantized_linear(module):
        return None
    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        if weight.dtype not in _FLOATS:
            return f"{name}: weight has dtype {weight.dtype} (not a float weight shira_fx can read)"
        if not _is_plain(weight):
            wcls = type(weight)
            return (f"{name}: weight is a {wcls.__module__}.{wcls.__qualname__} (a tensor subclass "
                    f"shira_fx does not know)")
        return None
    for attr in _PACKED_ATTRS:
        if hasattr(module, attr):
            return f"{name}: holds its weight packed in `{attr}` and has no float `weight`"
    return None


def _require_known(fn: str, module: nn.Module) -> str:
    kind = quantized_kind(module)
    if kind is None:
        cls = type(module)
        raise ValueError(
            f"{fn}: expected a quantized linear of a known kind (bitsandbytes Linear4bit/"
            f"Linear8bitLt, or nn.Linear with a torchao NF4/Int8/Int4 weight), found "
            f"{cls.__module__}.{cls.__qualname__}"
        )
    return kind


def logical_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of the weight a quantized (or plain) linear stands for.

    A bitsandbytes 4-bit weight is stored packed as (n, 1) bytes; its logical shape is the one
    recorded in its quant state.
    """
    found = _bnb_module(module)
    if found is not None and found[1] != "bnb_int8":
        state = getattr(module.weight, "quant_state", None)
        if state is not None:
            out_features, in_features = state.shape
            return int(out_features), int(in_features)
        return int(module.out_features), int(module.in_features)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        cls = type(module)
        found_desc = (f"a weight of shape {tuple(weight.shape)}" if isinstance(weight, Tensor)
                      else "no weight tensor")
        raise ValueError(
            f"logical_shape: expected a linear with a 2-D (out, in) weight, found "
            f"{cls.__module__}.{cls.__qualname__} with {found_desc}"
        )
    return int(weight.shape[0]), int(weight.shape[1])


def _probe_weight(module: nn.Module, out_features: int, in_features: int) -> Tensor:
    """The (out, in) weight read through the layer's own linear: F.linear(I, W) = W.T, in row
    blocks of the identity (for kinds whose library has no dequantize for this device)."""
    weight = module.weight
    parts = []
    for start in range(0, in_features, _PROBE_ROWS):
        rows = min(_PROBE_ROWS, in_features - start)
        eye = torch.zeros(rows, in_features, dtype=weight.dtype, device=weight.device)
        eye[:, start : start + rows].fill_diagonal_(1)
        parts.append(F.linear(eye, weight))
    return torch.cat(parts).t().contiguous()


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> Tensor:
    """The (out, in) float weight of a known quantized linear, by its library's own dequantize.

    Allocates one dense weight (one layer at a time: for masks that read weights, tests and
    oracles). bitsandbytes 4-bit: `dequantize_4bit` (in the quant state's dtype); 8-bit:
    `int8_vectorwise_dequant` of the int8 rows and their row scales (fp32); torchao NF4:
    `get_original_weight`; torchao Int8: `dequantize()`; torchao Int4: the layer's own linear
    applied to the identity (its packing variants have no dequantize on every device).
    """
    kind = _require_known("dequantized_weight", module)
    weight = module.weight
    if kind.startswith("bnb_"):
        import bitsandbytes.functional as bnb_f  # loaded already: the layer is bitsandbytes'
        if weight.dtype in _FLOATS:  # not quantized yet (bitsandbytes quantizes on .to(device))
            return weight.detach().clone()
        if kind == "bnb_int8":
            # the row scales sit on the weight until the first forward moves them to the
            # layer's matmul state; the int8 rows stay the weight's data throughout
            scb = getattr(weight, "SCB", None)
            if scb is None:
                scb = module.state.SCB
            return bnb_f.int8_vectorwise_dequant(weight.data, scb)
        data, state = weight.data, weight.quant_state
        if is_cpu_packed(module):  # unpacked on copies: the layer stays as it is
            data, state = _unpacked(data, state)
        # a weight of one byte (N * K <= 2) comes back transposed (a shim for a transposed layout)
        return bnb_f.dequantize_4bit(data, state).reshape(tuple(state.shape))
    if kind == "torchao_nf4":
        return weight.get_original_weight()
    if kind == "torchao_int4":  # its packing variants have no dequantize on every device
        return _probe_weight(module, *logical_shape(module))
    return weight.dequantize()


def is_cpu_packed(module: nn.Module) -> bool:
    """Whether a bitsandbytes 4-bit layer holds its weight in the CPU-packed layout."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def was_repacked(module: nn.Module) -> bool:
    """Whether a bitsandbytes 4-bit layer was ever converted to the CPU-packed layout (its
    absmax then rounded to bf16), packed now or converted back since."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return is_cpu_packed(module) or hasattr(state, "original_qshape")


def _unpacked(data: Tensor, state: Any) -> tuple[Tensor, Any]:
    """(data, quant state) of a CPU-packed bitsandbytes 4-bit weight in the standard layout, on
    copies, computing exactly what the packed layer computes with. The nibbles are unpacked by
    bitsandbytes' own conversion; the block scales are taken as the packed layer holds them
    (bf16, one row per block, transposed), un-transposed and kept unquantized: bitsandbytes'
    conversion would leave them transposed (non-nested states) or quantize them again (nested)."""
    import bitsandbytes.functional as bnb_f  # loaded already: a layer of its is packed

    unpack = getattr(bnb_f, "_convert_weight_packed_for_cpu_inverse", None)
    if unpack is None:
        raise ValueError("a bitsandbytes 4-bit weight is in the CPU-packed layout, but this "
                         "bitsandbytes has no conversion back (_convert_weight_packed_for_cpu_inverse)")
    state = copy.deepcopy(state)
    scales = state.absmax  # (in / blocksize, out): block b of row r at [b, r]
    state.original_nested = False  # unpack the nibbles only
    data, state = unpack(data.clone(), state)
    state.absmax = scales.t().reshape(-1).to(torch.float32).contiguous()
    return data, state


def settle_layout(module: nn.Module) -> Callable[[], None] | None:
    """Put a bitsandbytes 4-bit layer in the standard layout (a CPU-packed weight converted
    back: `_unpacked`) and keep it there: its forward no longer repacks. Returns the undo
    (bitsandbytes may repack again), or None for any other layer. What the layer computes with
    does not change (an earlier repack already rounded its absmax); a training step or a
    compiled graph then never meets a new layout."""
    found = _bnb_module(module)
    if found is None or found[1] == "bnb_int8":
        return None
    weight = module.weight
    if is_cpu_packed(module):
        weight.data, weight.quant_state = _unpacked(weight.data, weight.quant_state)
        if getattr(module, "quant_state", None) is not None:
            module.quant_state = weight.quant_state
    repacks = getattr(module, _REPACKS, None)
    if not repacks:
        return lambda: None
    setattr(module, _REPACKS, False)
    return lambda: setattr(module, _REPACKS, repacks)


# -- one GEMM on the dequantized weight ---------------------------------------------------------

# the kinds `dequantize_packed` rebuilds, with the number of packed tensors each takes (bnb 4-bit:
# 2 plain, 5 with nested absmax; torchao int8: 2, or 3 with zero points) and of the integers of
# its meta after (out, in)
DEQUANTIZING_KINDS = {
    "bnb_nf4": ((2, 5), (1, 2)),
    "bnb_fp4": ((2, 5), (1, 2)),
    "bnb_int8": ((2,), (0,)),
    "torchao_nf4": ((5,), (3,)),
    "torchao_int8": ((2, 3), (2,)),
}


class Dequantizing(NamedTuple):
    """What a layer that computes by dequantizing its weight hands `ops.dequantized_linear`: its
    kind, its packed tensors (never copied), `meta` = `[out, in, ...]` (the kind's integers after)
    and the dtype the layer casts its input to before its matmul (None: the input's own)."""

    kind: str
    packed: list[Tensor]
    meta: list[int]
    compute_dtype: torch.dtype | None


def _bnb4_state(module: nn.Module, weight: Tensor):
    """A bitsandbytes 4-bit layer's quant state: on its weight, or on the layer (or None)."""
    return getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)


def _bnb_compute_dtype(module: nn.Module, x: Tensor) -> torch.dtype | None:
    """The dtype `Linear4bit.forward` computes in for input x (its `set_compute_type` on the
    first call: an fp32 or bf16 input sets it, fp16 keeps the configured one), read without
    setting anything."""
    if getattr(module, "compute_type_is_set", True) or x.dtype not in (torch.float32, torch.bfloat16):
        return getattr(module, "compute_dtype", None)
    return x.dtype


def dequantizing(module: nn.Module, x: Tensor) -> Dequantizing | None:
    """The operands for one GEMM on the dequantized weight, where this layer (a known kind) itself
    computes input x by dequantizing its whole weight into a dense transient; None where it
    computes otherwise (the module's docstring says which and why), so the adapter rides beside it."""
    found = _bnb_module(module)
    weight = module.weight
    if found is not None:
        kind = found[1]
        if weight.dtype in _FLOATS:  # not quantized yet (bitsandbytes quantizes on .to(device))
            return None
        out_features, in_features = logical_shape(module)
        if kind == "bnb_int8":
            state = module.state
            if not module.training or x.device.type not in ("cpu", "xpu") or state.has_fp16_weights:
                return None
            scb = getattr(weight, "SCB", None)
            return Dequantizing(kind, [weight, state.SCB if scb is None else scb],
                                [out_features, in_features], None)
        state = _bnb4_state(module, weight)
        if state is None or is_cpu_packed(module):
            return None
        meta = [out_features, in_features, int(state.blocksize)]
        if state.nested:
            packed = [weight, state.absmax, state.state2.absmax, state.state2.code, state.offset]
            meta.append(int(state.state2.blocksize))
        else:
            packed = [weight, state.absmax]
        return Dequantizing(kind, packed, meta, _bnb_compute_dtype(module, x))
    kind = quantized_kind(module)
    if kind == "torchao_nf4":
        packed = [weight.quantized_data, weight.quantized_scalers, weight.quantization_factor,
                  weight.scaler_mean, weight.nf4]
        meta = [*logical_shape(module), weight.block_size, weight.n_blocks, weight.scaler_block_size]
        return Dequantizing(kind, packed, meta, None)
    if kind == "torchao_int8" and weight.act_quant_kwargs is None and weight.act_pre_scale is None:
        packed = [weight.qdata, weight.scale] + ([] if weight.zero_point is None else [weight.zero_point])
        return Dequantizing(kind, packed, [*logical_shape(module), *weight.block_size], None)
    return None


def dequantize_packed(kind: str, packed: list[Tensor], meta: list[int], dtype: torch.dtype) -> Tensor:
    """A fresh dense (out, in) weight in `dtype`, by the library's own dequantize, from what
    `dequantizing` gave: exactly the transient the layer's own matmul forms."""
    out_features, in_features, *ints = meta
    if kind in ("bnb_nf4", "bnb_fp4"):
        data, absmax, *nested = packed
        if nested:  # the absmax is itself quantized: as bitsandbytes' gemm_4bit dequantizes it
            absmax2, code2, offset = nested
            absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                absmax, absmax2, code2, ints[1], torch.float32) + offset
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            data, absmax, ints[0], kind.removeprefix("bnb_"), [out_features, in_features], dtype)
    if kind == "bnb_int8":  # as MatMul8bitFp: int8 rows times their scales over 127
        rows, scb = packed
        return rows.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
    if kind == "torchao_nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, SubclassTensorArgs

        data, scalers, factor, mean, lut = packed
        block_size, n_blocks, scaler_block_size = ints
        meta_args = SubclassTensorArgs((out_features, in_features), (in_features, 1), 0, mean.dtype,
                                       data.device, False)
        nf4 = NF4Tensor(meta_args, block_size, n_blocks, scaler_block_size, scalers, factor, mean, data, lut)
        return nf4.get_original_weight().to(dtype)
    if kind == "torchao_int8":
        from torchao.quantization.quant_primitives import dequantize_affine

        qdata, scale, *zero_point = packed
        return dequantize_affine(qdata, list(ints), scale, zero_point[0] if zero_point else None,
                                 torch.int8, output_dtype=dtype)
    raise ValueError(f"dequantize_packed: expected one of {sorted(DEQUANTIZING_KINDS)}, found {kind!r}")


def weight_with_delta(kind: str, packed: list[Tensor], meta: list[int], values: Tensor, indices: Tensor,
                      dtype: torch.dtype) -> Tensor:
    """The dequantized weight with the adapter's delta written in at its flat `indices`
    (`round(W + values)` in `dtype`, as a fused weight of that dtype holds it): a transient, O(nnz)
    beyond the dequantize; the packed weights are only read."""
    weight = dequantize_packed(kind, packed, meta, dtype)
    flat, idx = weight.view(-1), indices.long()
    flat.index_copy_(0, idx, (flat.index_select(0, idx) + values.detach()).to(dtype))
    return weight


def packed_tensors(module: nn.Module) -> list[Tensor]:
    """The tensors a known quantized layer holds that are not its parameters' own storage
    (bitsandbytes' quant state: absmax, nested absmax, code, offset, its int8 row scales; the
    inner tensors of a torchao weight): resident like the weight, for memory accounting
    (`shira_fx.memory.resident_state`)."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and _torchao_kind(weight) is not None:
        names, _ = weight.__tensor_flatten__()
        return [t for t in (getattr(weight, name) for name in names) if isinstance(t, Tensor)]
    found = _bnb_module(module)
    if found is None:
        return []
    if found[1] == "bnb_int8":
        scbs = (getattr(weight, "SCB", None), getattr(getattr(module, "state", None), "SCB", None))
        return [t for t in scbs if isinstance(t, Tensor)]
    state = _bnb4_state(module, weight)
    if state is None:
        return []
    parts = [state.absmax, getattr(state, "code", None), getattr(state, "offset", None)]
    if getattr(state, "state2", None) is not None:
        parts += [state.state2.absmax, state.state2.code]
    return [t for t in parts if isinstance(t, Tensor)]
