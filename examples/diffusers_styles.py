"""Style adapters for a diffusers pipeline with SHiRA: train two styles on a UNet's attention
and convolutions with a denoising loss, save them, serve both from one AdapterBank on
`pipe.unet`, switching and fusing between calls of `pipe(...)`.

    python examples/diffusers_styles.py            # a tiny pipeline from dummy components
    python examples/diffusers_styles.py --smoke    # fewer steps (the tests run this)

Offline: every component is built from a config with random weights (a real pipeline,
`StableDiffusionPipeline.from_pretrained(...)`, goes through the same lines from `prepare` on).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

import shira_fx
from shira_fx.targets import DIFFUSION_TARGETS


def dummy_pipeline(folder: str):
    """A Stable Diffusion pipeline from dummy components: a tiny UNet, VAE, CLIP text encoder
    and tokenizer (over the 26 letters, written to `folder`), a DDIM scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", "!", *letters,
                                         *(f"{c}</w>" for c in letters)])}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                              model_max_length=16)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def train_style(pipe, prompt: str, seed: int, steps: int, path: str) -> shira_fx.SparseAdapter:
    """A style adapter on the UNet's attention and convolutions: the denoising loss on a
    "style" (here random latents drawn from `seed`) for `prompt`, saved to `path`."""
    cfg = shira_fx.ShiraConfig(target_modules=DIFFUSION_TARGETS["unet"], density=0.02, seed=seed)
    adapter = shira_fx.prepare(pipe.unet, cfg, progress=False)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=16, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
    style = torch.randn(2, 4, 16, 16, generator=g)

    @shira_fx.train_step(adapter, opt)
    def step(t: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(style.shape, generator=g)
        noisy = pipe.scheduler.add_noise(style, noise, t)
        pred = pipe.unet(noisy, t, encoder_hidden_states=text.expand(2, -1, -1)).sample
        return torch.nn.functional.mse_loss(pred, noise)

    for _ in range(steps):
        step(torch.randint(0, pipe.scheduler.config.num_train_timesteps, (2,), generator=g))
    adapter.save(path)
    adapter.remove()  # the UNet is the base model again
    return adapter


def images(pipe, prompt: str, steps: int):
    return pipe(prompt, num_inference_steps=steps, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="fewer training and sampling steps")
    args = parser.parse_args(argv)
    train_steps, sample_steps = (2, 1) if args.smoke else (20, 4)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = dummy_pipeline(os.path.join(tmp, "tokenizer"))
        pipe.set_progress_bar_config(disable=args.smoke)
        for name, seed in (("watercolor", 1), ("neon", 2)):
            path = os.path.join(tmp, f"{name}.safetensors")
            train_style(pipe, f"a cat in {name} style", seed, train_steps, path)
        bank = shira_fx.AdapterBank(pipe.unet)  # serving: the styles switch in the fused weights
        for name in ("watercolor", "neon"):
            bank.load(name, os.path.join(tmp, f"{name}.safetensors"))
        out = {"null": images(pipe, "a cat", sample_steps)}  # the base UNet
        for spec in ("watercolor", "neon", {"watercolor": 1.0, "neon": 0.5}):
            bank.activate(spec)  # O(nnz) in place, no recompile
            out[json.dumps(spec)] = images(pipe, "a cat", sample_steps)
            change = abs(out[json.dumps(spec)] - out["null"]).max()
            print(f"{json.dumps(spec)}: the image moves by up to {change:.4f} from the base's")
        bank.deactivate()  # the base UNet again, bit for bit
        assert (images(pipe, "a cat", sample_steps) == out["null"]).all()
    return out


if __name__ == "__main__":
    main()
