"""Tiny diffusers models built from configs (random weights, no downloads), as diffusers' own
tests build them, each with a batch and a denoising-style loss (whole pipelines from dummy
components: examples/diffusers_styles.py)."""

from __future__ import annotations

import torch

from shira_fx.targets import DIFFUSION_TARGETS


def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8)


def sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                 joint_attention_dim=32, pooled_projection_dim=16, out_channels=4)


def flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


BUILDERS = {"unet": unet, "sd3": sd3, "flux": flux}
TARGETS = {"unet": DIFFUSION_TARGETS["unet"], "sd3": DIFFUSION_TARGETS["transformer"],
           "flux": DIFFUSION_TARGETS["transformer"]}


def batch(kind: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind == "unet":
        return {"sample": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor([3, 700]),
                "encoder_hidden_states": torch.randn(2, 5, 32, generator=g)}
    if kind == "sd3":
        return {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 500]),
                "encoder_hidden_states": torch.randn(2, 6, 32, generator=g),
                "pooled_projections": torch.randn(2, 16, generator=g)}
    return {"hidden_states": torch.randn(2, 16, 4, generator=g), "timestep": torch.tensor([0.5, 0.2]),
            "encoder_hidden_states": torch.randn(2, 6, 32, generator=g),
            "pooled_projections": torch.randn(2, 32, generator=g), "img_ids": torch.zeros(16, 3),
            "txt_ids": torch.zeros(6, 3)}


def loss(model, b: dict) -> torch.Tensor:
    """The mean square of the prediction (what a denoising loss against zero noise is)."""
    return model(**b).sample.pow(2).mean()
