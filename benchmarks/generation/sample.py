"""Sampling with diffusers' StableDiffusionPipeline built from the (fine-tuned) components.

Safety checker off (medical images, and no checker exists offline). Sampling uses DDIM built from
the training scheduler's config: deterministic given the seed and good at few steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peftvision.progress import progress

from .components import Components


def make_pipeline(c: Components, device: torch.device):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
        scheduler=DDIMScheduler.from_config(c.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate(c: Components, prompts: Sequence[str], *, image_size: int, inference_steps: int,
             batch_size: int, seed: int, device: torch.device,
             guidance_scale: float = 7.5) -> torch.Tensor:
    """(N, 3, S, S) uint8 images, one per prompt, from one seeded generator."""
    pipe = make_pipeline(c, device)
    generator = torch.Generator(device).manual_seed(seed)
    out = []
    for i in progress(range(0, len(prompts), batch_size), "sampling", unit="batch"):
        images = pipe(list(prompts[i:i + batch_size]), height=image_size, width=image_size,
                      num_inference_steps=inference_steps, guidance_scale=guidance_scale,
                      generator=generator, output_type="pt").images  # (B, 3, S, S) in [0, 1]
        out.append((images.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


def save_grid(images: torch.Tensor, path, columns: int = 8) -> None:
    """A PNG contact sheet of (N, 3, S, S) uint8 images."""
    from PIL import Image

    n, _, s, _ = images.shape
    rows = -(-n // columns)
    grid = torch.zeros(3, rows * s, min(n, columns) * s, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, r * s:(r + 1) * s, col * s:(col + 1) * s] = img
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
