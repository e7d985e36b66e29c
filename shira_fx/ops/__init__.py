"""The `shira_fx::` torch.library ops: schema, fake kernel, autograd and autocast of each.

Two kinds (autograd cannot be registered on a mutating op): functional ops that train or
serve, and the mutating `scatter_` for sync and switching, always outside autograd. One
module per kind of work:

- `linear`: `sparse_linear`, the dense linear on the fused weight, whose backward sends the
  masked gradient `masked_grad` to the values;
- `conv`: `sparse_conv` and `masked_conv_grad`, the same for a convolution;
- `quantized`: `side_linear` / `side_grad_x`, the adapter beside a quantized weight that is
  never dequantized, and `dequantized_linear` / `dequantized_grad_x`, one GEMM on a quantized
  layer's dequantized weight with the delta written in;
- `mixed`: `request_linear`, `side_segmented`, mixed batches;
- `scatter`: `scatter_` (and `scatter_weights_`, its caller-side entry).

Each op's real kernel is one dispatcher of `shira_fx.kernels` (Triton on CUDA, torch on the
CPU). Every fake kernel checks its operands' shapes, dtypes and devices (`checks`), naming the
operand, so a wrong call fails at trace time with a message instead of deep inside generated
code; `autocast` casts a training op's input and leaves the values fp32.
"""

from .conv import masked_conv_grad, sparse_conv
from .linear import masked_grad, sparse_linear
from .mixed import request_linear, side_segmented
from .quantized import dequantized_grad_x, dequantized_linear, side_grad_x, side_linear
from .scatter import scatter_, scatter_weights_

__all__ = [
    "dequantized_grad_x", "dequantized_linear", "masked_conv_grad", "masked_grad", "request_linear",
    "scatter_", "scatter_weights_", "side_grad_x", "side_linear", "side_segmented", "sparse_conv",
    "sparse_linear",
]
