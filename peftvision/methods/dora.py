"""DoRA (Liu et al., ICML 2024): weight-decomposed low-rank adaptation.

W' = m · (W0 + ΔW) / ‖W0 + ΔW‖, the norm taken per output unit (a row of a Linear weight, an
output filter of a conv), ΔW = s·B·A as in LoRA, m trained and initialised to ‖W0‖ so W' = W0 at
init. As in the paper (section 4.3) and peft, the norm is treated as a constant in the backward
pass. `pv.apply(model, "dora")` is `pv.apply(model, "lora", use_dora=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import AdapterLayer, adapter_dtype
from ..registry import register_method
from .base import MethodFacts
from .lora import LoRA, LoRAConv, LoRALayer, LoRALinear, lora_params


class DoRAMixin(LoRALayer):
    """The magnitude vector and the merge of a DoRA layer; `_base_product` is W0·x without bias."""

    # W' = (m/‖W0 + ΔW‖)·(W0 + ΔW) no longer holds ‖W0 + ΔW‖ (‖W'‖ = |m|), and m may be ~0:
    # merge keeps W0 and unmerge writes it back bit for bit
    stash_on_merge = True
    # peftvision.set_scale: the layer adds s·(its effect), W + s·(W' - W) when merged; DoRA's
    # LoRA scaling stays as trained (scaling ΔW inside the norm would not reach W at s = 0)
    effect_scale: float = 1.0

    def _setup_magnitude(self) -> None:
        if isinstance(self.base_layer, AdapterLayer):
            raise ConfigError("dora: the layer already has another adapter; DoRA renormalises the "
                              "whole weight, so apply dora first and the other method after it")
        weight = self.weighted_layer.weight
        self.lora_magnitude = nn.Parameter(self._norm(weight.detach()).to(adapter_dtype(weight)))  # (out,)

    def init_weights(self, init: str) -> None:
        super().init_weights(init)
        with torch.no_grad():  # ‖W0 + ΔW‖ = ‖W0‖ at init, whatever the LoRA initialisation
            self.lora_magnitude.copy_(self._norm(self._adapted_weight(self.weighted_layer.weight)))

    @staticmethod
    def _norm(weight: Tensor) -> Tensor:
        return weight.flatten(1).norm(dim=1)  # (out,)

    def _adapted_weight(self, weight: Tensor) -> Tensor:
        delta = self.delta_weight()  # in the adapter's dtype: the sum in the wider one
        return weight.to(delta.dtype) + delta  # (out, in, *k)

    def _on_output(self, v: Tensor, out: Tensor) -> Tensor:
        """(out,) -> broadcastable against the layer's output."""
        raise NotImplementedError

    def _base_product(self, x: Tensor) -> Tensor:
        """W0·x without the bias."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)  # W0·x + b
        weight = self.weighted_layer.weight
        with torch.no_grad():  # ‖W0 + ΔW‖ is a constant in the backward pass (paper §4.3)
            norm = self._norm(self._adapted_weight(weight))  # (out,)
        scale = self._on_output((self.lora_magnitude / norm).to(out.dtype), out)
        bias = self.weighted_layer.bias
        x_drop = self._drop(x)  # one dropout mask for both terms of the adapted path, as in peft
        if self.dropout is None:  # reuse W0·x from the base output
            w0x = out if bias is None else out - self._on_output(bias, out)
        else:
            w0x = self._base_product(x_drop)
        # b + W0·x + (m/‖·‖ - 1)·W0·x + (m/‖·‖)·ΔW·x = b + (m/‖·‖)·(W0 + ΔW)·x in eval mode
        effect = (scale - 1) * w0x + scale * self.branch(x, x_drop)
        return out + (effect if self.effect_scale == 1.0 else effect * self.effect_scale)

    def merge_into(self, weight, bias):  # W' = (m/‖W0 + ΔW‖)·(W0 + ΔW), bias unchanged
        adapted = self._adapted_weight(weight)  # (out, in, *k)
        merged = _on_weight(self.lora_magnitude / self._norm(adapted), weight) * adapted
        weight.copy_(merged if self.effect_scale == 1.0 else torch.lerp(weight.to(merged.dtype), merged,
                                                                         self.effect_scale))


def _on_weight(v: Tensor, weight: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (weight.dim() - 1)))  # (out, 1, ...)


class DoRALinear(DoRAMixin, LoRALinear):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__(base_layer, r, alpha, dropout, rslora)
        self._setup_magnitude()

    def _on_output(self, v: Tensor, out: Tensor) -> Tensor:
        return v  # (out,) broadcasts over (..., out)

    def _base_product(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weighted_layer.weight)  # (..., out)


class DoRAConv(DoRAMixin, LoRAConv):
    def __init__(self, base_layer: nn.modules.conv._ConvNd, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__(base_layer, r, alpha, dropout, rslora)
        self._setup_magnitude()

    def _on_output(self, v: Tensor, out: Tensor) -> Tensor:
        return v.reshape(1, -1, *([1] * (out.dim() - 2)))  # (1, out, 1, ...)

    def _base_product(self, x: Tensor) -> Tensor:
        return self.weighted_layer._conv_forward(x, self.weighted_layer.weight, None)  # (B, out, *sp)


@register_method
@dataclass
class DoRA(LoRA):
    """LoRA with a trained magnitude per output unit (use_dora=True)."""

    use_dora: bool = True

    name: ClassVar[str] = "dora"
    summary: ClassVar[str] = "LoRA direction + trained magnitude: m·(W0+ΔW)/‖W0+ΔW‖ on Linear/Conv"
    paper: ClassVar[str] = "Liu et al., ICML 2024"
    # LoRA's count plus one magnitude per output; DoRA normalises whole rows, so no qkv_parts
    test_facts: ClassVar = MethodFacts(
        variants={"": {"r": 4}},
        params_per_layer=lambda cfg, layer: lora_params(cfg, layer) + layer.weighted_layer.weight.shape[0])

    def validate(self) -> None:
        super().validate()
        if self.use_dora is not True:
            raise ConfigError("dora: use_dora is always True here; use method 'lora' for plain LoRA")
