"""TSA (Li et al., CVPR 2022, task-specific adapters) for ResNets.

A parallel 1x1 conv α (C_out x C_in, with the conv's stride) beside every conv that is a direct
child of a residual block: y = conv(x) + conv1x1(x, α). α starts at zero, so the model starts as
the base model (the reference uses 1e-4; since ∂y/∂α does not depend on α, both train alike).
Optionally a pre-classifier alignment β (features x features, identity init): logits = W·(β·f).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedArchitectureError
from ..layers import AdapterLayer, AdditiveDeltaLayer, like_kwargs
from ..registry import register_method
from ..surgery import get_module
from ..targets import GENERIC, TargetSpec
from .base import ApplyContext, Method, MethodFacts


def centre_tap_mergeable(conv: nn.Conv2d) -> str:
    """'' when a stride-matched 1x1 conv equals this conv's centre tap, else why not."""
    k, p, d = conv.kernel_size, conv.padding, conv.dilation
    if conv.groups != 1:
        return f"the conv has groups={conv.groups}; α is a full C_out x C_in matrix"
    if isinstance(p, str):
        return f"padding={p!r}"
    if any(ki % 2 == 0 for ki in k):
        return f"even kernel {tuple(k)} has no centre tap"
    if any(pi != di * (ki - 1) // 2 for ki, pi, di in zip(k, p, d)):
        return f"padding {tuple(p)} does not centre kernel {tuple(k)} (dilation {tuple(d)})"
    return ""


class TSAConv(AdditiveDeltaLayer):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        conv = self.weighted_layer  # (C_out, C_in, k, k)
        self.tsa_alpha = nn.Parameter(torch.zeros(conv.out_channels, conv.in_channels, 1, 1,
                                                  **like_kwargs(conv.weight)))
        self.why_not_mergeable = centre_tap_mergeable(conv)
        self.mergeable = not self.why_not_mergeable

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)  # (B, C_out, H', W')
        return out + self.output_delta(x)

    def output_delta(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.tsa_alpha.to(x.dtype), stride=self.weighted_layer.stride)  # (B, C_out, H', W')

    def delta_weight(self) -> Tensor:
        conv = self.weighted_layer
        kh, kw = conv.kernel_size
        delta = self.tsa_alpha.new_zeros(conv.weight.shape)  # (C_out, C_in, kh, kw)
        delta[:, :, kh // 2, kw // 2] = self.tsa_alpha[:, :, 0, 0]
        return delta

    def add_delta_(self, weight: Tensor, sign: float) -> None:
        kh, kw = self.weighted_layer.kernel_size
        weight[:, :, kh // 2, kw // 2].add_(self.tsa_alpha[:, :, 0, 0], alpha=sign)  # the centre tap only


class TSAAlignment(AdapterLayer):
    """β before the classifier: head(β·f). Merges into the head: W' = W·β.

    Unmerge would need β⁻¹ (singular β, or not exact in half precision): merge keeps the head's
    weight instead (a classes x features copy) and unmerge writes it back bitwise."""

    stash_on_merge = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        head = self.weighted_layer  # (classes, features)
        self.tsa_beta = nn.Parameter(torch.eye(head.in_features, **like_kwargs(head.weight)))

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(F.linear(x, self.tsa_beta.to(x.dtype)))  # (B, features) -> (B, classes)

    def merge_into(self, weight, bias):  # (classes, F) @ (F, F) in the wider dtype, rounded once
        dtype = torch.promote_types(weight.dtype, self.tsa_beta.dtype)
        weight.copy_(weight.to(dtype) @ self.tsa_beta.to(dtype))


@register_method
@dataclass
class TSA(Method):
    """Task-specific adapters: parallel 1x1 convs in every residual block."""

    targets: TargetSpec = None
    alignment: bool = False  # the pre-classifier β (features² parameters)

    name: ClassVar[str] = "tsa"
    kind: ClassVar[str] = "additive"
    architectures: ClassVar = (GENERIC,)
    placed: ClassVar[bool] = True  # defaults: the architecture registry (families.py)
    summary: ClassVar[str] = "parallel 1x1 conv α beside each residual-block conv (+ optional β)"
    paper: ClassVar[str] = "Li et al., CVPR 2022"
    targets_hint: ClassVar[str] = "names of its convs"
    test_facts: ClassVar = MethodFacts(  # α: C_out x C_in per conv; β: F x F
        variants={"": {}, "alignment": {"alignment": True}},
        params_per_layer=lambda cfg, layer: (layer.weighted_layer.in_features ** 2 if isinstance(layer, TSAAlignment)
                                             else layer.weighted_layer.out_channels * layer.weighted_layer.in_channels))

    def apply_to(self, ctx: ApplyContext) -> None:
        for name, _conv in ctx.find(self, self.target_spec(ctx), allowed=(nn.Conv2d,)):
            ctx.wrap(self, name, TSAConv)
        if self.alignment:
            heads = [n for n in ctx.head_modules if isinstance(get_module(ctx.model, n), nn.Linear)]
            if not heads:
                raise UnsupportedArchitectureError("tsa alignment=True needs a Linear classifier head")
            for name in heads:
                ctx.wrap(self, name, TSAAlignment)
