"""Convpass (Jie & Deng, 2022, "Convolutional Bypasses Are Better Vision Transformer Adapters").

A convolutional bypass beside the attention and beside the MLP of every ViT block, reading the
same normalised input as the sub-layer:

    x = x + attn(norm1(x)) + s · bypass(norm1(x))
    x = x + mlp(norm2(x)) + s · bypass(norm2(x))
    bypass(h) = up(drop(act(conv3x3(act(down(h))))))   act = QuickGELU

conv3x3 runs on the patch tokens laid out on the patch grid; each prefix token (class, register)
is a 1x1 image, so it sees only the kernel's centre tap. The conv starts as the identity on its
centre tap and up at zero (the model starts as the base model), as in the reference code.
Not mergeable: non-linearities and a spatial conv sit in the bypass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..layers import AdapterLayer, like_kwargs
from ..registry import register_method
from ..targets import VIT
from .base import ApplyContext, Method, number_in, positive_int
from .vision_blocks import refuse_second_block_runner, transformer_blocks


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


class ConvBypass(nn.Module):
    """down (D -> d), 3x3 conv (d -> d) on the patch grid, up (d -> D)."""

    def __init__(self, width: int, dim: int, prefix: int, grid: tuple[int, int], dropout: float,
                 like: Tensor) -> None:
        super().__init__()
        kw = like_kwargs(like)
        self.prefix, self.grid = prefix, grid
        self.down = nn.Linear(width, dim, **kw)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, **kw)
        self.up = nn.Linear(dim, width, **kw)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, 1, 1] = torch.eye(dim, **kw)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)  # identity at init
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, h: Tensor) -> Tensor:  # h: (B, N, D)
        n = h.shape[1]
        (rows, cols), p = self.grid, self.prefix
        if n - p != rows * cols:
            raise ValueError(f"convpass was applied for a {rows}x{cols} patch grid plus {p} prefix "
                             f"token(s) ({rows * cols + p} tokens); this input has {n} tokens. "
                             "Feed the image size the model was built for")
        z = quick_gelu(self.down(h.to(self.down.weight.dtype)))  # (B, N, d)
        centre = self.conv.weight[:, :, 1, 1]  # (d, d): a 3x3 conv on a 1x1 image
        z_prefix = F.linear(z[:, :p], centre, self.conv.bias)  # (B, p, d)
        grid = rearrange(z[:, p:], "b (h w) d -> b d h w", h=rows, w=cols)  # tokens row by row
        z_patch = rearrange(self.conv(grid), "b d h w -> b (h w) d")  # back to (B, H·W, d)
        z = self.dropout(quick_gelu(torch.cat([z_prefix, z_patch], dim=1)))  # (B, N, d)
        return self.up(z).to(h.dtype)  # (B, N, D)


class ConvpassBlock(AdapterLayer):
    mergeable = False
    why_not_mergeable = "Convpass's bypass has non-linearities and a spatial conv"
    runs_block = True  # forward re-runs the block's own steps (see vision_blocks)

    def __init__(self, base_layer: nn.Module, dim: int, scale: float, prefix: int,
                 grid: tuple[int, int], dropout: float) -> None:
        super().__init__(base_layer)
        block = self.weighted_layer
        width, like = block.norm1.normalized_shape[0], block.norm1.weight
        self.attn_bypass = ConvBypass(width, dim, prefix, grid, dropout, like)
        self.mlp_bypass = ConvBypass(width, dim, prefix, grid, dropout, like)
        self.scale = scale

    def forward(self, x: Tensor, **kwargs) -> Tensor:  # x: (B, N, D)
        b = self.weighted_layer  # a timm Block: run its own steps, adding the bypasses
        h = b.norm1(x)
        x = x + b.drop_path1(b.ls1(b.attn(h, **kwargs))) + b.drop_path1(self.attn_bypass(h)) * self.scale
        h = b.norm2(x)
        return x + b.drop_path2(b.ls2(b.mlp(h))) + b.drop_path2(self.mlp_bypass(h)) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"


@register_method
@dataclass
class Convpass(Method):
    """Convolutional bypasses beside the attention and the MLP of every timm ViT block."""

    dim: int = 8
    scale: float = 1.0
    dropout: float = 0.1

    name: ClassVar[str] = "convpass"
    kind: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = False
    architectures: ClassVar = (VIT,)
    summary: ClassVar[str] = "conv bypass (1x1 down, 3x3 on the patch grid, 1x1 up) beside attention and MLP"
    paper: ClassVar[str] = "Jie & Deng, 2022 (arXiv:2207.07039)"

    def validate(self) -> None:
        positive_int(self.name, "dim", self.dim)
        number_in(self.name, "scale", self.scale, -math.inf, math.inf, low_open=True, high_open=True)
        number_in(self.name, "dropout", self.dropout, 0, 1, high_open=True)

    def apply_to(self, ctx: ApplyContext) -> None:
        _family, blocks = transformer_blocks(ctx, self, self.architectures)
        prefix = ctx.model.num_prefix_tokens
        grid = tuple(ctx.model.patch_embed.grid_size)
        for name, _block in blocks:
            refuse_second_block_runner(ctx, self, name)
            ctx.wrap(self, name, lambda m: ConvpassBlock(m, self.dim, self.scale, prefix, grid,
                                                         self.dropout), innermost=True)
