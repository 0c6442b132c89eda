"""SSF (Lian et al., NeurIPS 2022): scale and shift features, y = γ ⊙ x + β per channel.

SSF sits after a layer and folds into it on merge: W' = diag(γ)·W, b' = γ ⊙ b + β.
γ ~ N(1, 0.02) and β ~ N(0, 0.02) as in the paper, so the model starts *near* (not exactly at)
the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..affine import ChannelAffineLayer
from ..errors import UnsupportedArchitectureError
from ..layers import like_kwargs
from ..registry import register_method
from ..targets import GENERIC, NORM_TYPES, TargetSpec, _loaded_class
from .base import ApplyContext, Method, MethodFacts, number_in

_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                  nn.modules.instancenorm._InstanceNorm)
SSF_LAYERS = (nn.Linear, nn.LayerNorm, *_CHANNEL_FIRST)


def channel_dim(layer: nn.Module) -> int:
    """The channel axis of `layer`'s output: 1 for NCHW layers, -1 for channel-last (NLC) ones."""
    layer_norm_2d = _loaded_class("timm.layers.norm", "LayerNorm2d")
    if isinstance(layer, _CHANNEL_FIRST) or (layer_norm_2d is not None and isinstance(layer, layer_norm_2d)):
        return 1
    return -1


def out_channels(layer: nn.Module) -> int:
    for attr in ("out_features", "out_channels", "num_features", "num_channels"):
        if hasattr(layer, attr):
            return getattr(layer, attr)
    return layer.normalized_shape[-1]  # LayerNorm


def _is_plain_layer_norm(layer: nn.Module) -> bool:
    """A LayerNorm whose forward is F.layer_norm with its own parameters (torch's, or timm's
    without its fused kernel)."""
    if type(layer) is nn.LayerNorm:
        return True
    timm_ln = _loaded_class("timm.layers.norm", "LayerNorm")
    return timm_ln is not None and type(layer) is timm_ln and not getattr(layer, "_fast_norm", True)


def plain_norm_forward(layer: nn.Module):
    """For timm's norm+activation layers (BatchNormAct2d, GroupNormAct...: norm, then drop, then
    act in one forward), the torch norm forward they extend; None for any other layer."""
    if not isinstance(getattr(layer, "act", None), nn.Module) or not type(layer).__module__.startswith("timm"):
        return None
    for cls in type(layer).__mro__:
        if cls.__module__.startswith("torch.nn") and cls in (*NORM_TYPES, nn.BatchNorm1d, nn.BatchNorm2d,
                                                             nn.BatchNorm3d):
            return cls.forward
    return None


class SSFLayer(ChannelAffineLayer):
    """y = γ ⊙ layer(x) + β on the layer's output channels (merge and unmerge: affine.py)."""

    def __init__(self, base_layer: nn.Module, init_std: float = 0.02) -> None:
        super().__init__(base_layer)
        layer = self.weighted_layer
        # a norm+act layer: SSF goes between its norm and its activation, so it still folds into
        # the norm's affine parameters on merge (after the activation it could not)
        self.norm_forward = plain_norm_forward(layer)
        self.reads_wrapped_layer = self.norm_forward is not None  # runs the norm's parts itself
        if self.norm_forward is not None and base_layer is not layer:
            raise UnsupportedArchitectureError(
                f"ssf on a {type(layer).__name__} that another adapter already wraps; apply ssf first")
        self.channel_dim = channel_dim(layer)
        channels = out_channels(layer)
        ref = next(layer.parameters(), None)
        kwargs = like_kwargs(ref) if ref is not None else {}
        self.ssf_scale = nn.Parameter(torch.empty(channels, **kwargs).normal_(1.0, init_std))
        self.ssf_shift = nn.Parameter(torch.empty(channels, **kwargs).normal_(0.0, init_std))

    def affine_params(self) -> tuple[Tensor, Tensor]:
        return self.ssf_scale, self.ssf_shift

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.norm_forward is not None:  # norm -> SSF -> drop -> act
            layer = self.weighted_layer  # another adapter's layer below is inactive (set_adapter)
            return layer.act(layer.drop(self.apply_affine(self.norm_forward(layer, x))))
        if self.plain_base and _is_plain_layer_norm(self.weighted_layer):
            return self._scaled_layer_norm(x)
        return self.apply_affine(self.base_layer(x, *args, **kwargs))  # keeps y, not the layer's output

    def _scaled_layer_norm(self, x: Tensor) -> Tensor:
        """γ ⊙ LN(x) + β as one layer norm with weight γ ⊙ w and bias γ ⊙ b + β (the merged form,
        equal up to fp32 rounding): it keeps only the norm's input, which it keeps anyway."""
        norm, scale, shift = self.weighted_layer, self.ssf_scale, self.ssf_shift  # plain_base
        weight = scale if norm.weight is None else norm.weight * scale
        bias = shift if norm.bias is None else torch.addcmul(shift, norm.bias, scale)
        dtype = x.dtype  # an fp32 adapter beside a half norm computes in the activations' dtype
        return F.layer_norm(x, norm.normalized_shape, weight.to(dtype), bias.to(dtype), norm.eps)


@register_method
@dataclass
class SSF(Method):
    """Scale-and-shift after the chosen layers."""

    targets: TargetSpec = None
    init_std: float = 0.02

    name: ClassVar[str] = "ssf"
    kind: ClassVar[str] = "additive"
    architectures: ClassVar = (GENERIC,)
    placed: ClassVar[bool] = True  # defaults: the architecture registry (families.py)
    summary: ClassVar[str] = "per-channel scale γ and shift β after ViT linears/norms or CNN BatchNorms"
    paper: ClassVar[str] = "Lian et al., NeurIPS 2022"
    # CNNs: after every norm, since SSF before a train-mode BN would be normalised away
    targets_hint: ClassVar[str] = "e.g. [nn.Linear, nn.LayerNorm]"
    # γ ~ N(1, .02), β ~ N(0, .02) (the paper's init): near, not at, the base model
    test_facts: ClassVar = MethodFacts(identity_at_init=False,
                                       params_per_layer=lambda cfg, layer: 2 * out_channels(layer.weighted_layer))

    def validate(self) -> None:
        number_in(self.name, "init_std", self.init_std, 0, 1)

    def apply_to(self, ctx: ApplyContext) -> None:
        spec = self.target_spec(ctx)
        for name, _module in ctx.find(self, spec, allowed=SSF_LAYERS):
            ctx.wrap(self, name, lambda m: SSFLayer(m, self.init_std))
