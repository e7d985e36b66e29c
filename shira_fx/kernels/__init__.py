"""Triton kernels for SHiRA, each beside its torch reference (the CPU path and test oracle),
and the masked gradient's plan and dispatcher."""

from .scatter import scatter_fused_, scatter_fused_reference_
from .sddmm import dense_block, sddmm, sddmm_cpu, sddmm_reference, sddmm_tiles
from .sddmm_inductor import sddmm_rowdot
from .sddmm_plan import PATHS, PLAN_FIELDS, choose_path, masked_grad, plan_mask
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
    "PATHS",
    "PLAN_FIELDS",
    "choose_path",
    "dense_block",
    "masked_grad",
    "plan_mask",
    "scatter_fused_",
    "scatter_fused_reference_",
    "sddmm",
    "sddmm_cpu",
    "sddmm_reference",
    "sddmm_rowdot",
    "sddmm_tiles",
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
