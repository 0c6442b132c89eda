"""LoHa (Hyeon-Woo et al., FedPara, ICLR 2022; LyCORIS): a Hadamard product of two low-rank terms.

ΔW = (alpha / r) · (W1a·W1b) ⊙ (W2a·W2b), rank up to r² for 4·r·(out + in) parameters. Conv
weights are flattened to (out, in/g · k·k) (LyCORIS' and peft's layout without the Tucker core).
W1a, W1b, W2a Kaiming-uniform and W2b zero, so ΔW = 0 at init (peft's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..layers import DenseDeltaLayer, like_kwargs
from ..registry import register_method
from ..targets import (
    GENERIC,
    TargetSpec,
)
from .base import ApplyContext, Method, number_in, positive_int


class LoHaLayer(DenseDeltaLayer):
    def __init__(self, base_layer: nn.Module, r: int, alpha: float) -> None:
        super().__init__(base_layer)
        weight = self.weighted_layer.weight  # (out, in/g, *k)
        out, fan_in = weight.shape[0], weight[0].numel()
        self.r, self.scaling = r, alpha / r
        like = like_kwargs(weight)
        self.hada_w1_a = nn.Parameter(torch.empty(out, r, **like))
        self.hada_w1_b = nn.Parameter(torch.empty(r, fan_in, **like))
        self.hada_w2_a = nn.Parameter(torch.empty(out, r, **like))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, fan_in, **like))
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def delta_weight(self) -> Tensor:
        w1 = self.hada_w1_a @ self.hada_w1_b  # (out, in/g·k·k)
        w2 = self.hada_w2_a @ self.hada_w2_b  # (out, in/g·k·k)
        return (w1 * w2 * self.scaling).reshape(self.weighted_layer.weight.shape)


@register_method
@dataclass
class LoHa(Method):
    """Low-rank Hadamard product adaptation of Linear and Conv layers."""

    r: int = 8
    alpha: float | None = None  # None: alpha = r (scaling 1)
    targets: TargetSpec = None

    name: ClassVar[str] = "loha"
    kind: ClassVar[str] = "additive"
    architectures: ClassVar = (GENERIC,)
    placed: ClassVar[bool] = True
    placement_of: ClassVar[str] = "lora"  # LoRA's default targets on every family (families.py)
    summary: ClassVar[str] = "ΔW = (alpha/r)·(W1a·W1b) ⊙ (W2a·W2b) on Linear/Conv layers (ViT qkv by default)"
    paper: ClassVar[str] = "Hyeon-Woo et al., ICLR 2022 (FedPara); LyCORIS"
    targets_hint: ClassVar[str] = "module names, a regex, or types such as nn.Linear"

    def validate(self) -> None:
        positive_int(self.name, "r", self.r)
        if self.alpha is not None:
            number_in(self.name, "alpha", self.alpha, 0, math.inf, low_open=True, high_open=True)

    def apply_to(self, ctx: ApplyContext) -> None:
        alpha = float(self.alpha if self.alpha is not None else self.r)
        allowed = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        for name, _ in ctx.find(self, self.target_spec(ctx), allowed=allowed):
            ctx.wrap(self, name, lambda m: LoHaLayer(m, self.r, alpha))
