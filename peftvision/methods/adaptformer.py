"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck branch parallel to each ViT block's MLP.

    x = x + attn-branch(x)
    x = x + MLP(LN(x)) + s · up(ReLU(down(x)))

The branch reads the MLP sub-block's input before its LayerNorm and adds after drop-path, as the
reference code does, so the wrapper re-runs timm's Block steps with the block's own modules.
up is zero-initialised (the model starts as the base model). Not mergeable: ReLU sits between
the two projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import AdapterLayer
from ..registry import register_method
from ..targets import _loaded_class
from .base import ApplyContext, Method, number_in, positive_int


class AdaptFormerBlock(AdapterLayer):
    mergeable = False
    why_not_mergeable = "AdaptFormer's branch has a ReLU between its projections"

    def __init__(self, base_layer: nn.Module, bottleneck: int, scale: float, learnable_scale: bool,
                 dropout: float) -> None:
        super().__init__(base_layer)
        width = self.weighted_layer.norm2.normalized_shape[0]
        ref = self.weighted_layer.norm1.weight
        kw = {"dtype": ref.dtype, "device": ref.device}
        self.down = nn.Linear(width, bottleneck, **kw)
        self.up = nn.Linear(bottleneck, width, **kw)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if learnable_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale), **kw))
        else:
            self.register_buffer("scale", torch.tensor(float(scale), **kw), persistent=False)

    def forward(self, x: Tensor, **kwargs) -> Tensor:  # x: (B, N, D)
        b = self.weighted_layer  # a timm Block: run its own steps, adding the parallel branch
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x), **kwargs)))
        branch = self.up(self.dropout(F.relu(self.down(x)))) * self.scale  # (B, N, D)
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))) + branch


@register_method
@dataclass
class AdaptFormer(Method):
    """Parallel bottleneck adapters beside the MLP of every timm ViT block."""

    bottleneck: int = 64
    scale: float = 0.1
    learnable_scale: bool = False
    dropout: float = 0.1

    name: ClassVar[str] = "adaptformer"
    kind: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = False
    architectures: ClassVar = ()
    placed: ClassVar[bool] = True  # every transformer MLP of the registered families (families.py)
    summary: ClassVar[str] = "bottleneck branch s·up(ReLU(down(x))) parallel to each ViT MLP"
    paper: ClassVar[str] = "Chen et al., NeurIPS 2022"

    def validate(self) -> None:
        positive_int(self.name, "bottleneck", self.bottleneck)
        number_in(self.name, "scale", self.scale, -math.inf, math.inf, low_open=True, high_open=True)
        number_in(self.name, "dropout", self.dropout, 0, 1, high_open=True)

    def apply_to(self, ctx: ApplyContext) -> None:
        ctx.require_architecture(self)
        block_cls = _loaded_class("timm.models.vision_transformer", "Block")
        blocks = ctx.find(self, r"blocks\.\d+", allowed=(block_cls,) if block_cls else (nn.Module,))
        for name, _block in blocks:
            ctx.wrap(self, name, lambda m: AdaptFormerBlock(m, self.bottleneck, self.scale,
                                                            self.learnable_scale, self.dropout),
                     innermost=True)
