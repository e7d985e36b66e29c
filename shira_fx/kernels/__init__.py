"""Triton kernels for SHiRA, each beside its torch reference (the CPU path and test oracle),
with one dispatcher per op of `shira_fx.ops`; this package exports what those ops call.

`scatter` (sync and switching), `sddmm` / `sddmm_cpp` / `masked_sddmm` (the masked
gradient, by the mask's `structure`), `side` / `side_cpu` / `side_segmented` (the adapter
beside a weight, one adapter or a mixed batch), `dense` (the layer's own linear).
"""

from .dense import dense_linear
from .masked_sddmm import masked_sddmm
from .scatter import scatter_layers_
from .side import side_product, side_product_t
from .side_segmented import mixed_linear_cpu, segmented_side_product

__all__ = [
    "dense_linear",
    "masked_sddmm",
    "mixed_linear_cpu",
    "scatter_layers_",
    "segmented_side_product",
    "side_product",
    "side_product_t",
]
