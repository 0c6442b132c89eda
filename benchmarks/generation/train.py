"""Fine-tune the UNet on image–caption pairs; the VAE and text encoder stay frozen.

The objective of diffusers' train_text_to_image.py: encode the image to latents (VAE posterior
sample x scaling_factor), add noise at a uniform random timestep with the DDPM scheduler, and
regress the UNet's prediction on the noise (or on v for v-prediction models) with MSE.

Under Hugging Face accelerate (`train(..., accelerator=...)`) the UNet, optimizer and loader are
prepared: `accelerate launch` with several processes gives each process its shard of every
global batch, and mixed precision runs the UNet under autocast. The random draws (posterior
noise, diffusion noise, timesteps) are made for the whole global batch on every process and each
process takes its rows, so N processes with batch B train the adapter that one process with
batch N x B trains (up to the all-reduce's float rounding).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from datetime import timedelta

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .components import Components

PRECISIONS = ("auto", "no", "fp16", "bf16")


def freeze(*modules: torch.nn.Module) -> None:
    for m in modules:
        m.requires_grad_(False).eval()


def make_accelerator(device: str | None, mixed_precision: str = "auto"):
    """An `accelerate.Accelerator` for one run. device None: CUDA when there is one (the launcher's
    GPU per process under `accelerate launch`), else CPU. "auto" precision: bf16 (fp16 where bf16
    is unsupported) on CUDA, none on CPU. fp16 on CPU is refused: accelerate would run it silently
    in fp32."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    if mixed_precision not in PRECISIONS:
        raise ValueError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got {mixed_precision!r}")
    if device and device.startswith("cuda:"):  # accelerate places each process on its own GPU
        raise ValueError(f"--device {device}: pick the GPU with CUDA_VISIBLE_DEVICES={device[5:]} and pass "
                         "--device cuda (accelerate chooses the device index)")
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} but no CUDA GPU is available; use --device cpu")
    cuda = torch.cuda.is_available() and device != "cpu"
    if mixed_precision == "auto":
        mixed_precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    if mixed_precision == "fp16" and not cuda:
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU (accelerate does not autocast fp16 "
                         "on CPU); on CPU use --mixed-precision bf16 or no")
    if PartialState._shared_state and PartialState().num_processes == 1:
        # One process, several runs (--seeds, tests): accelerate keeps device and precision
        # process-wide, so each run starts clean. Under a multi-process launch the state stays.
        AcceleratorState._reset_state(reset_partial_state=True)
    # Only the main process samples and computes FID; with --seeds the others wait for it at the
    # next run's first collective, so allow a long sampling pass before gloo/NCCL give up.
    wait = InitProcessGroupKwargs(timeout=timedelta(hours=6))
    return Accelerator(cpu=not cuda, mixed_precision=mixed_precision, kwargs_handlers=[wait])


@torch.no_grad()
def encode_prompts(c: Components, captions: Sequence[str], device: torch.device) -> torch.Tensor:
    """(B, 77, D) last hidden states of the frozen text encoder, as StableDiffusionPipeline uses."""
    ids = c.tokenizer(list(captions), padding="max_length", max_length=c.tokenizer.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(device)
    return c.text_encoder(ids)[0]


def diffusion_loss(c: Components, pixels: torch.Tensor, captions: Sequence[str],
                   generator: torch.Generator | None = None, unet: torch.nn.Module | None = None,
                   rank: int = 0, world: int = 1) -> torch.Tensor:
    """MSE of `unet` (default c.unet; a prepared/wrapped one under accelerate) on this batch.
    rank/world: this process's rows of the global batch, whose random draws every process makes
    in one order (posterior noise, diffusion noise, timesteps), so the draws follow the sample."""
    device = pixels.device
    b = pixels.shape[0]
    rows = slice(rank * b, (rank + 1) * b)
    with torch.no_grad():
        dist = c.vae.encode(pixels).latent_dist
        shape = (world * b, *dist.mean.shape[1:])  # (world*B, 4, h, w)
        eps = torch.randn(shape, generator=generator, device=device, dtype=dist.mean.dtype)[rows]
        latents = (dist.mean + dist.std * eps) * c.vae.config.scaling_factor  # (B, 4, h, w)
        text = encode_prompts(c, captions, device)
        noise = torch.randn(shape, generator=generator, device=device)[rows]
        t = torch.randint(0, c.scheduler.config.num_train_timesteps, (world * b,),
                          generator=generator, device=device)[rows]
        noisy = c.scheduler.add_noise(latents, noise, t)
        if c.scheduler.config.prediction_type == "v_prediction":
            target = c.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
    pred = (unet or c.unet)(noisy, t, encoder_hidden_states=text).sample
    return F.mse_loss(pred.float(), target.float())


def cycle(loader: DataLoader) -> Iterator:
    for _ in itertools.count():
        yield from loader


def train(c: Components, loader: DataLoader, steps: int, lr: float, device: torch.device,
          generator: torch.Generator | None = None, log_every: int = 0, accelerator=None) -> list[float]:
    """`steps` AdamW steps on the UNet's trainable parameters; returns the loss per step (the
    global batch's mean over processes). With `accelerator`, the UNet, optimizer and loader go
    through `accelerator.prepare` and c.unet is left unwrapped (plain forward) for sampling."""
    freeze(c.vae, c.text_encoder)
    params = [p for p in c.unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the UNet has no trainable parameters; apply a PEFT method first")
    opt = torch.optim.AdamW(params, lr=lr)
    unet, rank, world, main = c.unet, 0, 1, True
    if accelerator is not None:
        unet, opt, loader = accelerator.prepare(c.unet, opt, loader)
        rank, world = accelerator.process_index, accelerator.num_processes
        main = accelerator.is_main_process
    unet.train()
    losses = []
    for step, (pixels, captions) in zip(range(steps), cycle(loader)):
        loss = diffusion_loss(c, pixels.to(device), captions, generator, unet, rank, world)
        opt.zero_grad(set_to_none=True)
        if accelerator is None:
            loss.backward()
        else:
            accelerator.backward(loss)  # DDP averages the processes' gradients
        opt.step()
        if world > 1:
            loss = accelerator.reduce(loss.detach(), "mean")
        losses.append(loss.item())
        if main and log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {losses[-1]:.4f}", flush=True)
    if accelerator is not None:
        # drops DDP and the autocast forward (in place on c.unet): sampling runs in full precision
        accelerator.unwrap_model(unet, keep_fp32_wrapper=False)
    c.unet.eval()
    return losses
