"""Adapter modules. Adapter parameters are found by structure: they live in `Adapter` modules.

`AdapterLayer` wraps one base layer (Linear, Conv, Norm...). A mergeable subclass describes its
effect on the base weight and bias through `merged_weight_and_bias` / `unmerged_weight_and_bias`;
merge and unmerge are shared code built on those two functions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import MergeError


class Adapter(nn.Module):
    """Marker base class of every module peftvision inserts into a model."""

    method_name: str = ""


class AdapterLayer(Adapter):
    """Wraps `base_layer`; `forward` adds the adapter's effect unless it is merged."""

    mergeable: bool = True
    why_not_mergeable: str = ""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged = False

    @property
    def weighted_layer(self) -> nn.Module:
        """The innermost wrapped user layer (adapters may nest)."""
        layer = self.base_layer
        while isinstance(layer, AdapterLayer):
            layer = layer.base_layer
        return layer

    @property
    def merge_layer(self) -> nn.Module:
        """The user layer whose weight and bias `merge` rewrites: the wrapped layer, unless the
        adapter folds into another one (DiffFit's branch scale on `attn1` folds into `to_out.0`)."""
        return self.weighted_layer

    # -- the two functions a mergeable adapter implements --------------------------------------
    def merged_weight_and_bias(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Base (weight, bias) -> the (weight, bias) that make the base layer alone compute the
        adapted output. Return bias=None to leave the bias as it is."""
        raise MergeError(f"{type(self).__name__} cannot be merged: {self.why_not_mergeable}")

    def unmerged_weight_and_bias(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The inverse of `merged_weight_and_bias`."""
        raise MergeError(f"{type(self).__name__} cannot be unmerged: {self.why_not_mergeable}")

    def needs_bias_to_merge(self) -> bool:
        """True when merging writes a bias into a base layer that may have none (e.g. a shift)."""
        return False

    # -- shared merge / unmerge ------------------------------------------------------------------
    def merge_blocker(self) -> str:
        """Why this layer cannot merge, or '' when it can."""
        if not self.mergeable:
            return f"{self.method_name or type(self).__name__} ({self.why_not_mergeable})"
        layer = self.merge_layer
        if getattr(layer, "weight", None) is None:
            return (f"{self.method_name or type(self).__name__} into {type(layer).__name__} (the layer "
                    "has no weight to fold it into, e.g. a norm without affine)")
        return ""

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        blocker = self.merge_blocker()
        if blocker:
            raise MergeError(f"cannot merge {blocker}")
        layer = self.merge_layer
        bias = layer.bias
        created_bias = bias is None and self.needs_bias_to_merge()
        if created_bias:  # a LayerNorm's bias has its weight's shape; others one value per output
            shape = layer.weight.shape if isinstance(layer, nn.LayerNorm) else layer.weight.shape[:1]
            bias = layer.weight.new_zeros(shape)
        weight, new_bias = self.merged_weight_and_bias(layer.weight, bias)
        layer.weight.copy_(weight)
        if created_bias:
            layer.bias = nn.Parameter(new_bias, requires_grad=False)
        elif new_bias is not None:
            layer.bias.copy_(new_bias)
        self._created_bias = created_bias
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        layer = self.merge_layer
        weight, bias = self.unmerged_weight_and_bias(layer.weight, layer.bias)
        layer.weight.copy_(weight)
        if getattr(self, "_created_bias", False):
            layer.bias = None  # the base layer had no bias before merge
        elif bias is not None:
            layer.bias.copy_(bias)
        self.merged = False

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"method={self.method_name!r}, merged={self.merged}"


class AdditiveDeltaLayer(AdapterLayer):
    """An adapter whose merge is W + ΔW (and b + Δb): subclasses implement `delta_weight`."""

    @property
    def weight(self) -> Tensor:
        """The adapted weight W + ΔW, for parents that read their child's `.weight` and run the
        op themselves (timm EVA and BEiT: F.linear(x, self.qkv.weight, qkv_bias)): they then
        compute the adapted result, with gradients reaching the adapter."""
        weight = self.base_layer.weight  # a nested adapter's own adapted weight
        return weight if self.merged else weight + self.delta_weight().to(weight.dtype)

    def delta_weight(self) -> Tensor:
        raise NotImplementedError

    def delta_bias(self) -> Tensor | None:
        return None

    def merged_weight_and_bias(self, weight, bias):
        delta_bias = self.delta_bias()
        new_bias = None if delta_bias is None else bias + delta_bias.to(bias.dtype)
        return weight + self.delta_weight().to(weight.dtype), new_bias

    def unmerged_weight_and_bias(self, weight, bias):
        delta_bias = self.delta_bias()
        new_bias = None if delta_bias is None else bias - delta_bias.to(bias.dtype)
        return weight - self.delta_weight().to(weight.dtype), new_bias
