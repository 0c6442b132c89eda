"""LoKr (Yeh et al., ICLR 2024, "Navigating text-to-image customization"; LyCORIS): a Kronecker
product ΔW = (alpha / r) · W1 ⊗ W2.

out = a·b and in = c·d are split into near-square factors (`factor` caps the first one); W1 is a
full (a, c) matrix, W2 (b, d) is low rank W2a·W2b when r < max(b, d) / 2 and full otherwise
(`decompose_both` makes W1 low rank the same way). Conv weights are flattened to
(out, in/g · k·k), the kernel taken into W2 (peft's and LyCORIS' layout without the Tucker core).
W1 zero, the rest Kaiming-uniform, so ΔW = 0 at init (peft's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import DenseDeltaLayer, like_kwargs
from ..registry import register_method
from ..targets import (
    GENERIC,
    TargetSpec,
)
from .base import ApplyContext, Method, number_in, positive_int


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension and m <= n: `factor` itself when it divides, else the most
    balanced split whose m stays <= factor (-1: no cap). LyCORIS' rule, so layouts match."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    cap = dimension if factor == -1 else factor
    m, n = 1, dimension
    for cand in range(2, dimension + 1):  # divisors in increasing order; m + n shrinks towards √dim
        if dimension % cand:
            continue
        other = dimension // cand
        if cand > other or cand + other > m + n or cand > cap:
            break
        m, n = cand, other
    return (m, n) if m <= n else (n, m)


class LoKrLayer(DenseDeltaLayer):
    def __init__(self, base_layer: nn.Module, r: int, alpha: float, factor: int, decompose_both: bool) -> None:
        super().__init__(base_layer)
        weight = self.weighted_layer.weight  # (out, in/g, *k)
        kernel = math.prod(weight.shape[2:])  # 1 for Linear
        a, b = factorization(weight.shape[0], factor)  # out = a·b
        c, d = factorization(weight.shape[1], factor)  # in/g = c·d
        self.r, self.scaling = r, alpha / r
        like = like_kwargs(weight)
        if decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a = nn.Parameter(torch.zeros(a, r, **like))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c, **like))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
        else:
            self.lokr_w1 = nn.Parameter(torch.zeros(a, c, **like))
        if r < max(b, d) / 2:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r, **like))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d * kernel, **like))
            inits = (self.lokr_w2_a, self.lokr_w2_b)
        else:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *weight.shape[2:], **like))
            inits = (self.lokr_w2,)
        for p in inits:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def _factor(self, full: str) -> Tensor:
        if full in self._parameters:
            return self._parameters[full].flatten(1)
        return self._parameters[f"{full}_a"] @ self._parameters[f"{full}_b"]

    def delta_weight(self) -> Tensor:
        w1 = self._factor("lokr_w1")  # (a, c)
        w2 = self._factor("lokr_w2")  # (b, d·k·k)
        # kron: row i·b + p is output a·b's unit; column j·(d·k·k) + q is input channel j·d + q//(k·k)
        delta = torch.kron(w1, w2) * self.scaling  # (out, in/g·k·k)
        return delta.reshape(self.weighted_layer.weight.shape)


@register_method
@dataclass
class LoKr(Method):
    """Low-rank Kronecker product adaptation of Linear and Conv layers."""

    r: int = 8
    alpha: float | None = None  # None: alpha = r (scaling 1)
    factor: int = -1  # cap on the first factor of each split; -1: the most balanced split
    decompose_both: bool = False  # W1 low rank too
    targets: TargetSpec = None

    name: ClassVar[str] = "lokr"
    kind: ClassVar[str] = "additive"
    architectures: ClassVar = (GENERIC,)
    placed: ClassVar[bool] = True
    placement_of: ClassVar[str] = "lora"  # LoRA's default targets on every family (families.py)
    summary: ClassVar[str] = "ΔW = (alpha/r)·W1 ⊗ (W2a·W2b) on Linear/Conv layers (ViT qkv by default)"
    paper: ClassVar[str] = "Yeh et al., ICLR 2024 (LyCORIS)"
    targets_hint: ClassVar[str] = "module names, a regex, or types such as nn.Linear"

    def validate(self) -> None:
        positive_int(self.name, "r", self.r)
        if self.alpha is not None:
            number_in(self.name, "alpha", self.alpha, 0, math.inf, low_open=True, high_open=True)
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or not (
                self.factor == -1 or self.factor >= 1):
            raise ConfigError(f"lokr: factor must be -1 or a positive integer, got {self.factor!r}")
        if not isinstance(self.decompose_both, bool):
            raise ConfigError(f"lokr: decompose_both must be True or False, got {self.decompose_both!r}")

    def apply_to(self, ctx: ApplyContext) -> None:
        alpha = float(self.alpha if self.alpha is not None else self.r)
        allowed = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        for name, _ in ctx.find(self, self.target_spec(ctx), allowed=allowed):
            ctx.wrap(self, name, lambda m: LoKrLayer(m, self.r, alpha, self.factor, self.decompose_both))
