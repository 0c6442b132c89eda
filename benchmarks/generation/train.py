"""Fine-tune the UNet on image–caption pairs; the VAE and text encoder stay frozen.

The objective of diffusers' train_text_to_image.py: encode the image to latents (VAE posterior
sample x scaling_factor), add noise at a uniform random timestep with the DDPM scheduler, and
regress the UNet's prediction on the noise (or on v for v-prediction models) with MSE.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .components import Components


def freeze(*modules: torch.nn.Module) -> None:
    for m in modules:
        m.requires_grad_(False).eval()


@torch.no_grad()
def encode_prompts(c: Components, captions: Sequence[str], device: torch.device) -> torch.Tensor:
    """(B, 77, D) last hidden states of the frozen text encoder, as StableDiffusionPipeline uses."""
    ids = c.tokenizer(list(captions), padding="max_length", max_length=c.tokenizer.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(device)
    return c.text_encoder(ids)[0]


@torch.no_grad()
def encode_images(c: Components, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 4, H/f, W/f) scaled latents (a posterior sample)."""
    latents = c.vae.encode(pixels).latent_dist.sample(generator)
    return latents * c.vae.config.scaling_factor


def diffusion_loss(c: Components, pixels: torch.Tensor, captions: Sequence[str],
                   generator: torch.Generator | None = None) -> torch.Tensor:
    device = pixels.device
    latents = encode_images(c, pixels, generator)
    text = encode_prompts(c, captions, device)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    t = torch.randint(0, c.scheduler.config.num_train_timesteps, (latents.shape[0],),
                      generator=generator, device=device)
    noisy = c.scheduler.add_noise(latents, noise, t)
    if c.scheduler.config.prediction_type == "v_prediction":
        target = c.scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    pred = c.unet(noisy, t, encoder_hidden_states=text).sample
    return F.mse_loss(pred.float(), target.float())


def cycle(loader: DataLoader) -> Iterator:
    for _ in itertools.count():
        yield from loader


def train(c: Components, loader: DataLoader, steps: int, lr: float, device: torch.device,
          generator: torch.Generator | None = None, log_every: int = 0) -> list[float]:
    """`steps` AdamW steps on the UNet's trainable parameters; returns the loss per step."""
    freeze(c.vae, c.text_encoder)
    params = [p for p in c.unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the UNet has no trainable parameters; apply a PEFT method first")
    opt = torch.optim.AdamW(params, lr=lr)
    c.unet.train()
    losses = []
    for step, (pixels, captions) in zip(range(steps), cycle(loader)):
        loss = diffusion_loss(c, pixels.to(device), captions, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}", flush=True)
    c.unet.eval()
    return losses
