"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck branch parallel to each ViT block's MLP.

    x = x + attn-branch(x)
    x = x + MLP(LN(x)) + s · up(ReLU(down(x)))

On timm ViT blocks the branch reads the MLP sub-block's input before its LayerNorm and adds after
drop-path, as the reference code does, so the wrapper re-runs timm's Block steps with the block's
own modules. On other transformers (EVA, BEiT, Swin, MaxViT, DiT, SD3...), whose blocks differ,
the branch sits beside the MLP module itself and reads the MLP's (normalised) input.
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

from ..layers import AdapterLayer, like_kwargs
from ..registry import ReportedCount, register_method
from ..targets import _loaded_class
from .base import ApplyContext, Method, MethodFacts, number_in, positive_int
from .vision_blocks import refuse_second_block_runner


class AdaptFormerBranch(AdapterLayer):
    """Owns the branch s·up(ReLU(down(x))) over the last (channel) axis of width `width`."""

    mergeable = False
    why_not_mergeable = "AdaptFormer's branch has a ReLU between its projections"
    runs_block = True  # forward re-runs the block's own steps (see vision_blocks)

    def __init__(self, base_layer: nn.Module, width: int, bottleneck: int, scale: float,
                 learnable_scale: bool, dropout: float) -> None:
        super().__init__(base_layer)
        self.width = width
        ref = next(self.weighted_layer.parameters())
        kw = like_kwargs(ref)  # fp32 beside a half base by default
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

    def branch(self, x: Tensor) -> Tensor:  # (..., D) -> (..., D)
        h = x.to(self.down.weight.dtype)  # the adapter's dtype (fp32 beside a half base by default)
        return (self.up(self.dropout(F.relu(self.down(h)))) * self.scale).to(x.dtype)


class AdaptFormerBlock(AdaptFormerBranch):
    """A timm ViT Block: the paper's placement (reads the MLP sub-block's pre-norm input)."""

    def __init__(self, base_layer: nn.Module, *args) -> None:
        super().__init__(base_layer, _innermost(base_layer).norm2.normalized_shape[0], *args)

    def forward(self, x: Tensor, **kwargs) -> Tensor:  # x: (B, N, D)
        b = self.weighted_layer  # a timm Block: run its own steps, adding the parallel branch
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x), **kwargs)))
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))) + self.branch(x)  # (B, N, D)


class AdaptFormerMLP(AdaptFormerBranch):
    """Beside any MLP module (Linear MLPs on (..., D), 1x1-conv MLPs on (B, D, H, W))."""

    def __init__(self, base_layer: nn.Module, *args) -> None:
        first = next(m for m in _innermost(base_layer).modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        self.channel_first = isinstance(first, nn.Conv2d)
        super().__init__(base_layer, first.in_channels if self.channel_first else first.in_features, *args)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.channel_first:  # (B, D, H, W): the branch runs channel-last
            return out + self.branch(x.movedim(1, -1)).movedim(-1, 1)
        return out + self.branch(x)


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


def adaptformer_params(config: AdaptFormer, layer: AdaptFormerBranch) -> int:
    """down (D -> b, with bias) + up (b -> D, with bias) per adapted MLP."""
    b, d = config.bottleneck, layer.width
    return 2 * b * d + b + d + (1 if config.learnable_scale else 0)


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
    placed_where: ClassVar[str] = "AdaptFormer sits beside the MLPs of transformer blocks"
    summary: ClassVar[str] = "bottleneck branch s·up(ReLU(down(x))) parallel to each ViT MLP"
    paper: ClassVar[str] = "Chen et al., NeurIPS 2022"
    reported: ClassVar = tuple(  # bottleneck 5 reproduces them (docs/benchmarks.md)
        ReportedCount(model, figure, "Dutt et al., MIDL 2024, Table 6", (("bottleneck", 5),))
        for model, figure in (("vit_base_patch16_224", "0.1M"), ("vit_large_patch16_224", "0.3M"),
                              ("vit_huge_patch14_224", "0.5M")))
    test_facts: ClassVar = MethodFacts(params_per_layer=lambda cfg, layer: adaptformer_params(cfg, layer))

    def validate(self) -> None:
        positive_int(self.name, "bottleneck", self.bottleneck)
        number_in(self.name, "scale", self.scale, -math.inf, math.inf, low_open=True, high_open=True)
        number_in(self.name, "dropout", self.dropout, 0, 1, high_open=True)

    def apply_to(self, ctx: ApplyContext) -> None:
        block_cls = _loaded_class("timm.models.vision_transformer", "Block")
        args = (self.bottleneck, self.scale, self.learnable_scale, self.dropout)
        for name, module in ctx.find(self, self.default_targets(ctx)):
            if block_cls is not None and type(module) is block_cls:  # the paper's own placement
                refuse_second_block_runner(ctx, self, name)
                ctx.wrap(self, name, lambda m: AdaptFormerBlock(m, *args), innermost=True)
            else:
                mlp = f"{name}.mlp" if hasattr(module, "mlp") else name
                ctx.wrap(self, mlp, lambda m: AdaptFormerMLP(m, *args))
