"""VPT (Jia et al., ECCV 2022): learnable prompt tokens for timm ViTs (and Swin: vpt_swin.py).

Tokens go after the prefix tokens (class and register tokens): [CLS, (REG), P, patches].
shallow: inserted once, after the position embedding (wrapping `norm_pre`);
deep: inserted there and replaced by a fresh set before every later block.
The final `norm` wrapper drops them again, so forward_features returns the usual tokens and
every pooling (token, avg, map) works unchanged. Not mergeable: prompts are extra tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import repeat
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedArchitectureError
from ..layers import AdapterLayer, like_kwargs
from ..registry import register_method
from .base import ApplyContext, Method, MethodFacts, number_in, positive_int
from .vpt_swin import SwinPrompts, check_runnable

DEFAULT_TOKENS = {"shallow": 5, "deep": 10}


class PromptLayer(AdapterLayer):
    """Base of VPT's wrappers; `offset` = number of prefix tokens before the prompts."""

    mergeable = False
    why_not_mergeable = "VPT prompts are extra tokens, not a weight change"

    def __init__(self, base_layer: nn.Module, offset: int, tokens: int) -> None:
        super().__init__(base_layer)
        self.offset, self.tokens = offset, tokens


class PromptTokens(PromptLayer):
    """Owns one set of prompts (1, P, D): `insert` adds them after the prefix, `replace`
    overwrites the previous layer's prompts."""

    def __init__(self, base_layer, offset, tokens, width, init_bound, dropout, replace, like):
        super().__init__(base_layer, offset, tokens)
        self.replace, self.width = replace, width
        self.prompts = nn.Parameter(torch.empty(1, tokens, width, **like_kwargs(like)))
        nn.init.uniform_(self.prompts, -init_bound, init_bound)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _with_prompts(self, x: Tensor) -> Tensor:  # x: (B, N, D)
        prompts = repeat(self.dropout(self.prompts.to(x.dtype)), "1 p d -> b p d", b=x.shape[0])  # (B, P, D)
        rest = x[:, self.offset + self.tokens:] if self.replace else x[:, self.offset:]
        return torch.cat([x[:, :self.offset], prompts, rest], dim=1)  # (B, N (+P), D)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.replace:  # before a block: its own prompts
            return self.base_layer(self._with_prompts(x), *args, **kwargs)
        return self._with_prompts(self.base_layer(x, *args, **kwargs))  # after norm_pre


class PromptRemoval(PromptLayer):
    """Before the final norm: drop the prompts, so the usual token layout leaves the model."""

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(torch.cat([x[:, :self.offset], x[:, self.offset + self.tokens:]], dim=1))


@register_method
@dataclass
class VPT(Method):
    """Visual prompt tuning, shallow or deep."""

    mode: str = "deep"
    tokens: int | None = None  # None: 5 (shallow) or 10 (deep)
    dropout: float = 0.0

    name: ClassVar[str] = "vpt"
    kind: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = False
    architectures: ClassVar = ()
    placed: ClassVar[bool] = True  # families with a plain token sequence (families.py)
    placed_where: ClassVar[str] = "prompt tokens need a timm ViT's token sequence or a timm Swin's windows"
    summary: ClassVar[str] = "learnable prompt tokens before the first (shallow) or every (deep) block"
    paper: ClassVar[str] = "Jia et al., ECCV 2022"
    # prompts are extra tokens from the start; tokens x D per prompt set
    test_facts: ClassVar = MethodFacts(
        identity_at_init=False, variants={"shallow": {"mode": "shallow"}, "deep": {"mode": "deep"}},
        params_per_layer=lambda cfg, layer: vpt_params(layer))

    def validate(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in DEFAULT_TOKENS:
            raise ConfigError(f"vpt: mode must be 'shallow' or 'deep', got {self.mode!r}")
        if self.tokens is not None:
            positive_int(self.name, "tokens", self.tokens)
        number_in(self.name, "dropout", self.dropout, 0, 1, high_open=True)

    def apply_to(self, ctx: ApplyContext) -> None:
        model = ctx.model
        if ctx.architecture == "swin":
            return self._apply_swin(ctx)
        if not all(hasattr(model, a) for a in ("norm_pre", "blocks", "norm", "num_prefix_tokens")):
            raise UnsupportedArchitectureError("vpt needs a timm VisionTransformer "
                                               "(norm_pre, blocks, norm, num_prefix_tokens)")
        width = model.embed_dim
        patch = math.prod(model.patch_embed.patch_size)
        bound = math.sqrt(6.0 / (3 * patch + width))  # VPT: uniform(±sqrt(6 / (3·p² + D)))
        n = self.tokens if self.tokens is not None else DEFAULT_TOKENS[self.mode]
        offset, like = model.num_prefix_tokens, model.patch_embed.proj.weight

        def prompts(replace: bool):
            return lambda m: PromptTokens(m, offset, n, width, bound, self.dropout, replace, like)

        ctx.wrap(self, "norm_pre", prompts(replace=False))
        if self.mode == "deep":
            for i in range(1, len(model.blocks)):
                ctx.wrap(self, f"blocks.{i}", prompts(replace=True))
        ctx.wrap(self, "norm", lambda m: PromptRemoval(m, offset, n))

    def _apply_swin(self, ctx: ApplyContext) -> None:
        """The paper's Swin variant: one wrapper on `layers` carries the prompts (vpt_swin.py)."""
        model = ctx.model
        stages = model.layers  # another named adapter may hold its prompts there
        stages = stages.weighted_layer if isinstance(stages, AdapterLayer) else stages
        check_runnable(stages)
        # the paper's bound uses the patch size and the first stage's width for every stage
        bound = math.sqrt(6.0 / (3 * math.prod(model.patch_embed.patch_size) + model.embed_dim))
        dims = [block.dim for stage in stages for block in stage.blocks]
        n = self.tokens if self.tokens is not None else DEFAULT_TOKENS[self.mode]
        deep = self.mode == "deep"
        like = model.patch_embed.proj.weight
        ctx.wrap(self, "layers", lambda m: SwinPrompts(m, n, dims if deep else dims[:1], bound,
                                                       self.dropout, deep, like))


def vpt_params(layer: AdapterLayer) -> int:
    """Prompt parameters a VPT wrapper adds: P·D per prompt set (ViT); on Swin, P·C of the first
    block (shallow) or P·C_i summed over every block i (deep)."""
    if isinstance(layer, PromptTokens):
        return layer.tokens * layer.width
    if isinstance(layer, SwinPrompts):
        dims = [block.dim for stage in layer.weighted_layer for block in stage.blocks]
        return layer.tokens * (sum(dims) if layer.deep else dims[0])
    return 0
