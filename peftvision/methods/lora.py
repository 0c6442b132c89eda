"""LoRA (Hu et al., ICLR 2022): W0 + (alpha / r) · B · A with A Kaiming-uniform and B zero.

Linear, Conv (A has the base conv's geometry, B is 1x1) and fused qkv projections where only a
subset of q, k, v is adapted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedArchitectureError
from ..layers import AdditiveDeltaLayer
from ..registry import register_method
from ..targets import GENERIC, TargetSpec
from .base import ApplyContext, Method, MethodFacts, number_in, positive_int

QKV = "qkv"


class LoRALayer(AdditiveDeltaLayer):
    """Shared parts: scaling and optional input dropout (no module at all when p == 0)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float) -> None:
        super().__init__(base_layer)
        self.r = r
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def _drop(self, x: Tensor) -> Tensor:
        return x if self.dropout is None else self.dropout(x)


class LoRALinear(LoRALayer):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, r, alpha, dropout)
        base_layer = self.weighted_layer
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)  # (..., out)
        if self.merged:
            return out
        low = F.linear(self._drop(x), self.lora_A)  # (..., r)
        return out + F.linear(low, self.lora_B) * self.scaling

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)


class LoRAFusedLinear(LoRALayer):
    """LoRA on chosen slices of a fused projection (timm's qkv: out = [q; k; v], each D wide)."""

    def __init__(self, base_layer: nn.Linear, parts: str, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, r, alpha, dropout)
        base_layer = self.weighted_layer
        if base_layer.out_features % len(QKV):
            raise ConfigError(f"fused qkv needs out_features divisible by 3, got {base_layer.out_features}")
        self.slots = [QKV.index(p) for p in parts]  # which thirds are adapted, in q, k, v order
        self.width = base_layer.out_features // len(QKV)
        weight = base_layer.weight
        n = len(self.slots)
        self.lora_A = nn.Parameter(torch.empty(n, r, base_layer.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(n, self.width, r, dtype=weight.dtype, device=weight.device))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)  # (..., 3D)
        if self.merged:
            return out
        n, r = self.lora_A.shape[:2]
        low = F.linear(self._drop(x), self.lora_A.reshape(n * r, -1))  # (..., n*r)
        low = low.unflatten(-1, (n, r))  # (..., n, r)
        delta = torch.einsum("...nr,ndr->...nd", low, self.lora_B) * self.scaling  # (..., n, D)
        return out + self._scatter(delta)

    def _scatter(self, delta: Tensor) -> Tensor:
        """(..., n, D) deltas of the adapted slots -> (..., 3D) with zeros in the others."""
        zeros = None
        pieces = []
        for slot in range(len(QKV)):
            if slot in self.slots:
                pieces.append(delta.select(-2, self.slots.index(slot)))
            else:
                zeros = zeros if zeros is not None else delta.new_zeros(*delta.shape[:-2], self.width)
                pieces.append(zeros)
        return torch.cat(pieces, dim=-1)

    def delta_weight(self) -> Tensor:
        per_slot = torch.bmm(self.lora_B, self.lora_A) * self.scaling  # (n, D, in)
        delta = per_slot.new_zeros(len(QKV), self.width, per_slot.shape[-1])  # (3, D, in)
        delta[self.slots] = per_slot
        return delta.reshape(-1, per_slot.shape[-1])  # (3D, in)


class LoRAConv(LoRALayer):
    """Conv LoRA. `r` is the rank per group: A is a conv with the base's kernel, stride, padding,
    dilation and groups (g·r outputs), B a grouped 1x1 conv, so ΔW has the base weight's shape."""

    def __init__(self, base_layer: nn.modules.conv._ConvNd, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, r, alpha, dropout)
        base_layer = self.weighted_layer
        weight = base_layer.weight  # (out, in/g, *k)
        g = base_layer.groups
        self.lora_A = nn.Parameter(torch.empty(g * r, *weight.shape[1:], dtype=weight.dtype, device=weight.device))
        ones = (1,) * (weight.dim() - 2)
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], r, *ones, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._pointwise = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)  # (B, out, *spatial')
        if self.merged:
            return out
        base = self.weighted_layer
        low = base._conv_forward(self._drop(x), self.lora_A, None)  # (B, g*r, *spatial'): base geometry
        return out + self._pointwise(low, self.lora_B, groups=base.groups) * self.scaling

    def delta_weight(self) -> Tensor:
        g = self.weighted_layer.groups
        a = self.lora_A.reshape(g, self.r, -1)  # (g, r, in/g * k)
        b = self.lora_B.reshape(g, -1, self.r)  # (g, out/g, r)
        delta = torch.bmm(b, a) * self.scaling  # (g, out/g, in/g * k)
        return delta.reshape(self.weighted_layer.weight.shape)


def lora_params(config: LoRA, layer: LoRALayer) -> int:
    """r·(in + out) per adapted matrix; a conv's "in" is C_in·k·k; a fused qkv slice is D wide."""
    base = layer.weighted_layer
    if isinstance(layer, LoRAFusedLinear):
        return len(layer.slots) * config.r * (base.in_features + base.out_features // len(QKV))
    if isinstance(base, nn.Linear):
        return config.r * (base.in_features + base.out_features)
    return config.r * (base.in_channels * math.prod(base.kernel_size) + base.out_channels)


@register_method
@dataclass
class LoRA(Method):
    """Low-rank adaptation of Linear and Conv layers."""

    r: int = 8
    alpha: float | None = None  # None: alpha = r (scaling 1)
    dropout: float = 0.0
    targets: TargetSpec = None
    qkv_parts: str | None = None  # e.g. "qv": adapt only those slices of a fused qkv Linear

    name: ClassVar[str] = "lora"
    kind: ClassVar[str] = "additive"
    architectures: ClassVar = (GENERIC,)
    placed: ClassVar[bool] = True  # defaults: the architecture registry (families.py)
    summary: ClassVar[str] = "low-rank ΔW = (alpha/r)·B·A on Linear/Conv layers (ViT qkv by default)"
    paper: ClassVar[str] = "Hu et al., ICLR 2022"
    targets_hint: ClassVar[str] = "module names, a regex, or types such as nn.Linear"
    test_facts: ClassVar = MethodFacts(variants={"": {"r": 4}, "qv": {"r": 4, "qkv_parts": "qv"}},
                                       params_per_layer=lora_params)

    def validate(self) -> None:
        positive_int(self.name, "r", self.r)
        if self.alpha is not None:
            number_in(self.name, "alpha", self.alpha, 0, math.inf, low_open=True, high_open=True)
        number_in(self.name, "dropout", self.dropout, 0, 1, high_open=True)
        if self.qkv_parts is not None:
            if not isinstance(self.qkv_parts, str):
                raise ConfigError(f"lora: qkv_parts must be a string such as 'qv', got {self.qkv_parts!r}")
            parts = self.qkv_parts.lower().replace(",", "")
            if not parts or any(p not in QKV for p in parts) or len(set(parts)) != len(parts):
                raise ConfigError(f"lora: qkv_parts must be a non-empty subset of 'qkv' such as 'qv', "
                                  f"got {self.qkv_parts!r}")
            self.qkv_parts = "".join(sorted(parts, key=QKV.index))

    def apply_to(self, ctx: ApplyContext) -> None:
        ctx.require_architecture(self)
        spec = self.target_spec(ctx)
        alpha = float(self.alpha if self.alpha is not None else self.r)
        allowed = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        for name, module in ctx.find(self, spec, allowed=allowed):
            if isinstance(module, nn.Linear):
                fused = self.qkv_parts is not None and self.qkv_parts != QKV and name.endswith(QKV)
                if fused and ctx.architecture != GENERIC and "qkv-thirds" not in ctx.arch.traits:
                    raise UnsupportedArchitectureError(  # e.g. MaxxVit interleaves q, k, v per head
                        f"lora: qkv_parts={self.qkv_parts!r} needs a qkv laid out [q; k; v]; "
                        f"{type(ctx.model).__name__}'s is not. Leave qkv_parts unset to adapt all of it")
                factory = (
                    (lambda m: LoRAFusedLinear(m, self.qkv_parts, self.r, alpha, self.dropout)) if fused
                    else (lambda m: LoRALinear(m, self.r, alpha, self.dropout))
                )
            else:
                factory = lambda m: LoRAConv(m, self.r, alpha, self.dropout)  # noqa: E731
            ctx.wrap(self, name, factory)
