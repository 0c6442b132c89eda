"""IA3 (Liu et al., NeurIPS 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning"): learned per-channel rescaling vectors, initialised to ones.

Transformers: l_k ⊙ k and l_v ⊙ v (the outputs of the key and value projections; on a fused
[q; k; v] projection only its k and v thirds) and l_ff ⊙ h, the MLP hidden activation, which is
the input of the MLP's second Linear. CNNs: the output channels of the block convs.

Merge: scaling a layer's outputs folds into its rows, W' = diag(l)·W, b' = l ⊙ b; scaling its
input folds into its columns, W' = W·diag(l). Unmerge divides by l (fp32 rounding, like SSF); a
scale with a zero or tiny entry makes merge keep the exact weight instead. All of this is the
per-channel affine layer SSF and DiffFit share (affine.py); this file says only where l goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..affine import ChannelAffineLayer
from ..layers import like_kwargs
from ..registry import register_method
from ..targets import GENERIC, TargetSpec, check_target_spec
from .base import ApplyContext, Method, MethodFacts

IA3_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class IA3Layer(ChannelAffineLayer):
    """y = l ⊙ layer(x) on output channels [start, stop) (`on_input`: y = layer(l ⊙ x)); forward,
    merge and unmerge are the shared per-channel affine layer's (affine.py)."""

    effect_scale: float = 1.0  # peftvision.set_scale: l becomes 1 + s·(l - 1)

    def __init__(self, base_layer: nn.Module, on_input: bool, start: int = 0) -> None:
        super().__init__(base_layer)
        layer = self.weighted_layer
        self.on_input, self.start = on_input, start
        self.channel_dim = 1 if isinstance(layer, nn.modules.conv._ConvNd) else -1  # NCHW or (..., C)
        channels = layer.weight.shape[1 if on_input else 0] * (getattr(layer, "groups", 1) if on_input else 1)
        self.ia3_scale = nn.Parameter(torch.ones(channels - start, **like_kwargs(layer.weight)))

    def affine_params(self) -> tuple[Tensor, None]:
        """l over every channel (with set_scale's s: 1 + s·(l - 1), i.e. W·diag(l) - W scaled by
        s), padded with ones over those it leaves alone (a fused qkv's q third)."""
        scale = self.ia3_scale
        if self.effect_scale != 1.0:
            scale = 1 + (scale - 1) * self.effect_scale
        if not self.start:
            return scale, None
        return torch.cat([scale.new_ones(self.start), scale]), None  # (channels,)


def ia3_params(config: IA3, layer: IA3Layer) -> int:
    """One scale per rescaled channel: C_out (the k and v thirds of a fused qkv), or C_in."""
    weight = layer.weighted_layer.weight
    if layer.on_input:
        return weight.shape[1] * getattr(layer.weighted_layer, "groups", 1)
    return weight.shape[0] * 2 // 3 if layer.start else weight.shape[0]


@register_method
@dataclass
class IA3(Method):
    """Learned rescaling of attention keys/values and MLP activations (conv outputs on CNNs)."""

    targets: TargetSpec = None  # layers whose outputs are rescaled
    input_targets: TargetSpec = None  # layers whose inputs are rescaled (an MLP's second Linear)
    fused_qkv: bool = True  # a Linear named "qkv" laid out [q; k; v]: rescale only its k, v thirds

    name: ClassVar[str] = "ia3"
    kind: ClassVar[str] = "additive"
    architectures: ClassVar = (GENERIC,)
    placed: ClassVar[bool] = True  # {"outputs": ..., "inputs": ...} per family (families.py)
    summary: ClassVar[str] = "learned per-channel rescaling of keys, values and MLP activations (conv outputs)"
    paper: ClassVar[str] = "Liu et al., NeurIPS 2022"
    targets_hint: ClassVar[str] = "layers to rescale the outputs of; input_targets= for MLP second Linears"
    test_facts: ClassVar = MethodFacts(params_per_layer=lambda cfg, layer: ia3_params(cfg, layer))

    def validate(self) -> None:
        check_target_spec(self.name, self.input_targets)

    def apply_to(self, ctx: ApplyContext) -> None:
        if self.targets is not None or self.input_targets is not None:
            outputs, inputs = self.targets, self.input_targets
        else:
            placement = self.default_targets(ctx)
            outputs, inputs = placement.get("outputs"), placement.get("inputs")
        thirds = ctx.architecture == GENERIC or "qkv-thirds" in ctx.arch.traits
        for name, module in ctx.find(self, outputs, allowed=IA3_LAYERS) if outputs is not None else ():
            fused = (self.fused_qkv and thirds and name.rpartition(".")[2] == "qkv"
                     and isinstance(module, nn.Linear) and module.out_features % 3 == 0)
            start = module.out_features // 3 if fused else 0  # k and v: the last two thirds
            ctx.wrap(self, name, lambda m, s=start: IA3Layer(m, on_input=False, start=s))
        for name, _module in ctx.find(self, inputs, allowed=IA3_LAYERS) if inputs is not None else ():
            ctx.wrap(self, name, lambda m: IA3Layer(m, on_input=True))
