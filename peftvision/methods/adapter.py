"""Bottleneck adapters (Houlsby et al., ICML 2019; Pfeiffer et al., EACL 2021) for ViT and Swin.

Each adapter sits on the output of a block's sub-layer, inside its residual branch:

    h = sublayer(x);  h = h + up(act(down(h)))

houlsby: after the attention and after the MLP of every block; pfeiffer: after the MLP only.
up is zero-initialised, so the model starts as the base model. Not mergeable: the non-linearity
sits between the two projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import AdapterLayer, like_kwargs
from ..registry import register_method
from ..targets import VIT
from .base import ApplyContext, Method, positive_int
from .vision_blocks import SWIN, transformer_blocks

PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
# adapter-transformers' defaults for the two configurations
DEFAULT_ACTIVATION = {"houlsby": "swish", "pfeiffer": "relu"}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}


class BottleneckAdapter(AdapterLayer):
    mergeable = False
    why_not_mergeable = "a bottleneck adapter has a non-linearity between its projections"

    def __init__(self, base_layer: nn.Module, width: int, bottleneck: int, activation: str,
                 like: Tensor) -> None:
        super().__init__(base_layer)
        kw = like_kwargs(like)
        self.down = nn.Linear(width, bottleneck, **kw)
        self.up = nn.Linear(bottleneck, width, **kw)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # identity at init
        nn.init.zeros_(self.up.bias)
        self.activation = activation

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        h = self.base_layer(x, *args, **kwargs)  # (..., D): attention or MLP output
        z = ACTIVATIONS[self.activation](self.down(h.to(self.down.weight.dtype)))  # (..., m)
        return h + self.up(z).to(h.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


@register_method
@dataclass
class BottleneckAdapters(Method):
    """Sequential bottleneck adapters after attention and/or MLP of every ViT / Swin block."""

    placement: str = "houlsby"
    bottleneck: int = 8
    activation: str | None = None  # None: swish (houlsby) or relu (pfeiffer)

    name: ClassVar[str] = "adapter"
    kind: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = False
    architectures: ClassVar = (VIT, SWIN)
    summary: ClassVar[str] = ("bottleneck h + up(act(down(h))) after attention and MLP (houlsby) "
                              "or MLP only (pfeiffer)")
    paper: ClassVar[str] = "Houlsby et al., ICML 2019; Pfeiffer et al., EACL 2021"

    def validate(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"adapter: placement must be one of {sorted(PLACEMENTS)}, "
                              f"got {self.placement!r}")
        positive_int(self.name, "bottleneck", self.bottleneck)
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ConfigError(f"adapter: activation must be None or one of {sorted(ACTIVATIONS)}, "
                              f"got {self.activation!r}")

    def apply_to(self, ctx: ApplyContext) -> None:
        _family, blocks = transformer_blocks(ctx, self, self.architectures)
        activation = self.activation or DEFAULT_ACTIVATION[self.placement]
        for name, block in blocks:
            width = block.norm1.normalized_shape[0]
            for site in PLACEMENTS[self.placement]:
                ctx.wrap(self, f"{name}.{site}", partial(
                    BottleneckAdapter, width=width, bottleneck=self.bottleneck,
                    activation=activation, like=block.norm1.weight))
