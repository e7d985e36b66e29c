"""Triton kernels for SHiRA, each beside its torch reference (the CPU path and test oracle)."""

from .scatter import scatter_fused_, scatter_fused_reference_
from .sddmm import sddmm, sddmm_cpu, sddmm_reference

__all__ = [
    "scatter_fused_",
    "scatter_fused_reference_",
    "sddmm",
    "sddmm_cpu",
    "sddmm_reference",
]
