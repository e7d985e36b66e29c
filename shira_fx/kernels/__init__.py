"""Triton kernels for SHiRA, each beside its torch reference (the CPU path and test oracle)."""

from .scatter import scatter_fused_, scatter_fused_reference_
from .sddmm import sddmm, sddmm_cpu, sddmm_reference
from .side import (
    pack_adapters,
    side_backward_x,
    side_backward_x_cpu,
    side_backward_x_reference,
    side_backward_x_segmented,
    side_backward_x_segmented_cpu,
    side_backward_x_segmented_reference,
    side_backward_x_segmented_triton,
    side_backward_x_triton,
    side_forward,
    side_forward_cpu,
    side_forward_reference,
    side_forward_segmented,
    side_forward_segmented_cpu,
    side_forward_segmented_reference,
    side_forward_segmented_triton,
    side_forward_triton,
)

__all__ = [
    "scatter_fused_",
    "scatter_fused_reference_",
    "sddmm",
    "sddmm_cpu",
    "sddmm_reference",
    "pack_adapters",
    "side_backward_x",
    "side_backward_x_cpu",
    "side_backward_x_reference",
    "side_backward_x_segmented",
    "side_backward_x_segmented_cpu",
    "side_backward_x_segmented_reference",
    "side_backward_x_segmented_triton",
    "side_backward_x_triton",
    "side_forward",
    "side_forward_cpu",
    "side_forward_reference",
    "side_forward_segmented",
    "side_forward_segmented_cpu",
    "side_forward_segmented_reference",
    "side_forward_segmented_triton",
    "side_forward_triton",
]
