"""Triton kernels for SHiRA, each beside its torch reference (the CPU path and test oracle),
with one dispatcher per op of `shira_fx.ops`; this package exports what those ops call.

`scatter` (sync and switching), `sddmm` / `sddmm_cpp` / `masked_sddmm` (the masked
gradient, by the mask's `structure`), `masked_conv` (a convolution's masked weight gradient),
`side` / `side_cpu` / `side_segmented` (the adapter beside a weight, one adapter or a mixed
batch), `dequantized` (one GEMM on a quantized layer's dequantized weight with the delta written
in), `dense` (the layer's own linear).
"""

from .dense import dense_linear
from .dequantized import delta_grad_x, delta_linear
from .masked_conv import conv_weight_grad_at
from .masked_sddmm import masked_sddmm
from .scatter import scatter_layers_
from .side import side_product, side_product_t
from .side_segmented import mixed_linear_cpu, segmented_side_product

__all__ = [
    "conv_weight_grad_at",
    "delta_grad_x",
    "delta_linear",
    "dense_linear",
    "masked_sddmm",
    "mixed_linear_cpu",
    "scatter_layers_",
    "segmented_side_product",
    "side_product",
    "side_product_t",
]
