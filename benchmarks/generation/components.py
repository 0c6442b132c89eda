"""Stable Diffusion components: from the Hub / a local folder, or tiny random ones offline.

    --model runwayml/stable-diffusion-v1-5   from_pretrained(id, subfolder=...) (needs the network)
    --model DIR                             DIR/{unet,vae,text_encoder,tokenizer,scheduler}/
    --model tiny                            the real diffusers/transformers classes, tiny configs,
                                            random weights (seed 0, the same base for every run)

The tiny tokenizer is a real CLIPTokenizer over a character-level byte vocabulary (the 256
byte-level symbols, alone and with CLIP's end-of-word suffix): it needs no vocab download and
behaves like CLIP's inside StableDiffusionPipeline (padding to 77, truncation, batch_decode).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TINY_SEED = 0  # the tiny "pretrained" weights: fixed, so runs with other --seed share one base


@dataclass
class Components:
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any  # the training (noise) scheduler, a DDPMScheduler

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the DIR layout `--model DIR` reads (handy to freeze a tiny base to disk)."""
        root = Path(directory)
        for name in SUBFOLDERS:
            getattr(self, name).save_pretrained(root / name)
        return root


def tiny_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())  # 256 printable stand-ins for the bytes
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_components(image_size: int = 32) -> Components:
    """Tiny SD-shaped components: VAE with one 2x downsample, so latents are (4, S/2, S/2)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(
            sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, norm_num_groups=8, sample_size=image_size,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1)  # SD-1.5's schedule
    return Components(unet, vae, text_encoder, tokenizer, scheduler)


def load_components(model: str, image_size: int = 32) -> Components:
    """`tiny`, a local DIR with the five subfolders, or a Hub id (from_pretrained, subfolders)."""
    if model == "tiny":
        return tiny_components(image_size)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(model)
    if path.exists():
        missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"{path} lacks subfolder(s) {missing}; --model DIR needs "
                                    f"{', '.join(SUBFOLDERS)}")
    try:
        return Components(
            unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
            vae=AutoencoderKL.from_pretrained(model, subfolder="vae"),
            text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
            scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler"))
    except OSError as exc:
        raise SystemExit(f"cannot load {model!r} ({exc}). Offline, use --model tiny or a local "
                         f"folder with {', '.join(SUBFOLDERS)}/") from exc
