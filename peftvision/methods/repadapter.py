"""RepAdapter (Luo et al., 2023, "Towards Efficient Visual Adaption via Structural
Re-parameterization").

A linear adapter on the input of each block's attention and MLP, with no non-linearity:

    x' = x + s · B(drop(A(x)))      A: D -> h dense, B: h -> D group-wise (g groups), both biased

Attention reads its input only through `qkv`, the MLP only through `fc1`, so the adapter wraps
those Linears and merges into them by re-parameterisation: with M = B·A (D x D, B block-diagonal)
and c = B·a + b_B,  W' = W + s·W·M,  b' = b + s·W·c.
B starts at zero (the model starts as the base model). Unmerge writes back the exact pre-merge
weight (the inverse of W ↦ W(I + sM) needs a matrix inverse).

Swin v2's attention reads its input through F.linear(x, qkv.weight, [q_bias; k_bias; v_bias]),
never calling qkv, so there the adapter wraps the attention (same input, same maths). It does
not merge: s·W·c would have to enter the key bias, which Swin v2 keeps as a fixed zero buffer
(not saved with the model), and with cosine attention a constant key shift changes the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import AdapterLayer, like_kwargs
from ..registry import register_method
from ..surgery import get_module
from ..targets import VIT
from .base import ApplyContext, Method, number_in, positive_int
from .vision_blocks import SWIN, transformer_blocks


class RepAdapterLinear(AdapterLayer):
    stash_on_merge = True  # W(I + sM) has no exact in-place inverse

    def __init__(self, base_layer: nn.Linear, hidden: int, groups: int, scale: float,
                 dropout: float) -> None:
        super().__init__(base_layer)
        linear = self.input_linear
        width, kw = linear.in_features, like_kwargs(linear.weight)
        self.groups, self.scale = groups, scale
        self.A = nn.Linear(width, hidden, **kw)
        self.B_weight = nn.Parameter(torch.zeros(width, hidden // groups, **kw))  # grouped 1x1
        self.B_bias = nn.Parameter(torch.zeros(width, **kw))
        nn.init.xavier_uniform_(self.A.weight)
        nn.init.zeros_(self.A.bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapter(self, x: Tensor) -> Tensor:  # x: (..., D) -> (..., D)
        z = self.dropout(self.A(x)).unflatten(-1, (self.groups, -1))  # (..., g, h/g)
        w = self.B_weight.unflatten(0, (self.groups, -1))  # (g, D/g, h/g)
        return torch.einsum("...gi,goi->...go", z, w).flatten(-2) + self.B_bias

    @property
    def input_linear(self) -> nn.Linear:
        """The Linear that reads the adapted input (the wrapped layer itself here)."""
        return self.weighted_layer

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:  # x: (..., D)
        h = x.to(self.A.weight.dtype)
        return self.base_layer(x + (self.adapter(h) * self.scale).to(x.dtype), *args, **kwargs)

    def needs_bias_to_merge(self) -> bool:
        return True  # c may be non-zero on a bias-free layer

    def merge_into(self, weight: Tensor, bias: Tensor | None) -> None:
        dense_b = torch.block_diag(*self.B_weight.unflatten(0, (self.groups, -1)))  # (D, h)
        m = dense_b @ self.A.weight  # (D, D)
        c = dense_b @ self.A.bias + self.B_bias  # (D,)
        w = weight.to(m.dtype)
        bias.add_(F.linear(c, w) * self.scale)  # s·W·c, with the weight before merging
        weight.add_((w @ m) * self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}, scale={self.scale}"


class RepAdapterAttention(RepAdapterLinear):
    """The adapter on the input of a Swin v2 window attention (which reads qkv.weight itself)."""

    mergeable = False
    why_not_mergeable = ("Swin v2 has no key bias to fold the adapter's constant term into (its k_bias "
                         "is a fixed zero buffer) and its cosine attention is not invariant to it")
    stash_on_merge = False

    @property
    def input_linear(self) -> nn.Linear:
        qkv = self.weighted_layer.qkv
        return qkv.weighted_layer if isinstance(qkv, AdapterLayer) else qkv


@register_method
@dataclass
class RepAdapter(Method):
    """Linear group-wise adapters before the attention and the MLP of every ViT / Swin block."""

    hidden: int = 8
    groups: int = 2
    scale: float = 1.0
    dropout: float = 0.1

    name: ClassVar[str] = "repadapter"
    kind: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = True
    architectures: ClassVar = (VIT, SWIN)
    summary: ClassVar[str] = ("linear adapter x + s·B(A(x)) (B group-wise) before attention and MLP, "
                              "merged into qkv and fc1")
    paper: ClassVar[str] = "Luo et al., 2023 (arXiv:2302.08106)"

    def validate(self) -> None:
        positive_int(self.name, "hidden", self.hidden)
        positive_int(self.name, "groups", self.groups)
        if self.hidden % self.groups:
            raise ConfigError(f"repadapter: hidden ({self.hidden}) must be divisible by groups "
                              f"({self.groups})")
        number_in(self.name, "scale", self.scale, -math.inf, math.inf, low_open=True, high_open=True)
        number_in(self.name, "dropout", self.dropout, 0, 1, high_open=True)

    def apply_to(self, ctx: ApplyContext) -> None:
        _family, blocks = transformer_blocks(ctx, self, self.architectures)
        for name, block in blocks:
            # Swin v2's attention reads qkv.weight instead of calling qkv: adapt the attention's input
            v2 = type(block).__name__ == "SwinTransformerV2Block"
            for site in ("attn.qkv", "mlp.fc1"):
                linear = get_module(ctx.model, f"{name}.{site}")
                linear = linear.weighted_layer if isinstance(linear, AdapterLayer) else linear
                if not isinstance(linear, nn.Linear) or linear.in_features % self.groups:
                    raise ConfigError(f"repadapter needs {name}.{site} to be a Linear whose input "
                                      f"width is divisible by groups={self.groups}, got {linear}")
                on_attention = v2 and site == "attn.qkv"
                layer = RepAdapterAttention if on_attention else RepAdapterLinear
                ctx.wrap(self, f"{name}.attn" if on_attention else f"{name}.{site}", lambda m, cls=layer: cls(
                    m, self.hidden, self.groups, self.scale, self.dropout))
