"""One GEMM per quantized linear: the layer's weight dequantized into a dense transient, as the
quantization library's own matmul forms it, with the adapter's delta written in (O(nnz)), then
the GEMM. The dispatchers of `shira_fx::dequantized_linear` and `shira_fx::dequantized_grad_x`;
the transient lives for one call, so nothing weight-sized outlives it (backward rebuilds it, as
the library's own backward does)."""

import torch.nn.functional as F
from torch import Tensor

from ..quantized import weight_with_delta


def delta_linear(x: Tensor, packed: list[Tensor], bias: Tensor | None, values: Tensor, indices: Tensor,
                 kind: str, meta: list[int]) -> Tensor:
    """`x @ (dequantize(packed) + S).T + bias` in x's dtype (S: `S.flat[indices] = values`)."""
    weight = weight_with_delta(kind, packed, meta, values, indices, x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def delta_grad_x(grad_y: Tensor, packed: list[Tensor], values: Tensor, indices: Tensor, kind: str,
                 meta: list[int]) -> Tensor:
    """`grad_y @ (dequantize(packed) + S)` in grad_y's dtype: `delta_linear`'s input gradient,
    on the transient rebuilt."""
    weight = weight_with_delta(kind, packed, meta, values, indices, grad_y.dtype)
    return grad_y @ weight
