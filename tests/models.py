"""Tiny instances of the real timm / diffusers classes (pretrained=False) and their inputs."""

from __future__ import annotations

import torch
from torch import nn

BATCH = 2


def tiny_vit(**kw) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)
    return VisionTransformer(**{**cfg, **kw})


def tiny_resnet(block: str = "bottleneck", **kw) -> nn.Module:
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    cfg = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8, num_classes=5,
               zero_init_last=False)  # zero-init last BN would make the blocks' outputs trivial
    return ResNet(block=Bottleneck if block == "bottleneck" else BasicBlock, **{**cfg, **kw})


def tiny_unet(**kw) -> nn.Module:
    from diffusers import UNet2DConditionModel

    cfg = dict(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
               attention_head_dim=8, norm_num_groups=8, sample_size=8, in_channels=4, out_channels=4,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return UNet2DConditionModel(**{**cfg, **kw})


FACTORIES = {"vit": tiny_vit, "resnet": tiny_resnet, "unet": tiny_unet}


def make_model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FACTORIES[arch]()


def make_inputs(arch: str, seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    if arch == "unet":
        return (torch.randn(BATCH, 4, 8, 8, generator=g), torch.tensor([10, 500]),
                torch.randn(BATCH, 3, 16, generator=g))
    return (torch.randn(BATCH, 3, 32, 32, generator=g),)


def run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    out = model(*inputs)
    return out.sample if hasattr(out, "sample") else out


def make_target(arch: str, out: torch.Tensor, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if arch == "unet":
        return torch.randn(out.shape, generator=g)
    return torch.randint(0, out.shape[-1], (out.shape[0],), generator=g)


def loss_fn(arch: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if arch == "unet":
        return nn.functional.mse_loss(out, target)
    return nn.functional.cross_entropy(out, target)
