"""FacT (Jie & Deng, AAAI 2023, "FacT: Factor-Tuning for Lightweight Adaptation on Vision
Transformer").

The increments of every D x D slice of every block's weights (q, k, v, proj, and the D x D chunks
of fc1 and fc2) are factorised with factors U (r x D) and V (D x r) shared across all layers:

    ΔW_j = s · V · C_j · U          (D x D; j runs over the slices)
    TT (tensor train):  C_j is a free r x r core per slice;
    TK (Tucker):        C_j = Σ_k c[:, :, k] · p_j[k], a shared r x r x r core c, a vector p_j per slice.

V starts at zero, so the model starts as the base model. Mergeable: ΔW is a weight increment.
The shared factors are parameters of the first wrapped layer; the others refer to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import AdapterLayer, AdditiveDeltaLayer, like_kwargs
from ..registry import register_method
from ..surgery import get_module
from ..targets import VIT
from .base import ApplyContext, Method, number_in, positive_int
from .vision_blocks import transformer_blocks

FORMATS = ("tt", "tk")


class FacTFactors(nn.Module):
    """U, V (and TK's core c), shared by every layer FacT adapts."""

    def __init__(self, width: int, rank: int, fmt: str, like: Tensor) -> None:
        super().__init__()
        kw = like_kwargs(like)
        self.U = nn.Parameter(torch.empty(rank, width, **kw))  # D -> r
        self.V = nn.Parameter(torch.zeros(width, rank, **kw))  # r -> D; zero: identity at init
        nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))
        if fmt == "tk":
            self.core = nn.Parameter(torch.empty(rank, rank, rank, **kw))
            nn.init.xavier_uniform_(self.core)


class FacTLinear(AdditiveDeltaLayer):
    """FacT on one Linear made of `slices` D x D blocks: stacked along the output (qkv: [q; k; v],
    fc1) or along the input (fc2)."""

    def __init__(self, base_layer: nn.Linear, factors: FacTFactors, fmt: str, slices: int,
                 split_input: bool, scale: float, dropout: float, owner: bool) -> None:
        super().__init__(base_layer)
        rank, kw = factors.U.shape[0], like_kwargs(factors.U)
        if owner:
            self.factors = factors  # registered once: its parameters are saved and counted once
        self._shared = (factors,)  # a tuple hides the module from registration
        self.fmt, self.slices, self.split_input, self.scale = fmt, slices, split_input, scale
        if fmt == "tt":
            self.cores = nn.Parameter(torch.empty(slices, rank, rank, **kw))  # C_j
            nn.init.kaiming_uniform_(self.cores, a=math.sqrt(5))
        else:
            self.mix = nn.Parameter(torch.empty(slices, rank, **kw))  # p_j
            nn.init.xavier_uniform_(self.mix)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def shared(self) -> FacTFactors:
        return self._shared[0]

    def slice_cores(self) -> Tensor:  # (P, r, r)
        if self.fmt == "tt":
            return self.cores
        return torch.einsum("abk,pk->pab", self.shared.core, self.mix)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        f = self.shared
        cores = self.slice_cores()  # (P, r, r)
        h = x.to(f.U.dtype)
        if self.split_input:  # fc2: x (..., P·D) -> Σ_j V C_j U x_j
            u = F.linear(h.unflatten(-1, (self.slices, -1)), f.U)  # (..., P, r)
            t = torch.einsum("pab,...pb->...a", cores, u)  # (..., r)
            y = F.linear(self.dropout(t), f.V)  # (..., D)
        else:  # qkv, proj, fc1: [V C_j U x]_j
            t = torch.einsum("pab,...b->...pa", cores, F.linear(h, f.U))  # (..., P, r)
            y = F.linear(self.dropout(t), f.V).flatten(-2)  # (..., P·D)
        return out + (y * self.scale).to(out.dtype)

    def delta_weight(self) -> Tensor:
        f = self.shared
        blocks = f.V @ self.slice_cores() @ f.U * self.scale  # (P, D, D)
        return torch.cat(list(blocks), dim=1 if self.split_input else 0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.fmt!r}, slices={self.slices}"


@register_method
@dataclass
class FacT(Method):
    """Factor-tuning: every block's weight increments share factors U, V across layers."""

    format: str = "tt"
    rank: int = 8
    scale: float = 1.0
    dropout: float = 0.1

    name: ClassVar[str] = "fact"
    kind: ClassVar[str] = "additive"
    mergeable: ClassVar[bool] = True
    architectures: ClassVar = (VIT,)
    summary: ClassVar[str] = ("ΔW = s·V·C·U on qkv, proj, fc1, fc2 of every block, U and V shared "
                              "across layers (TT or TK cores)")
    paper: ClassVar[str] = "Jie & Deng, AAAI 2023"

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"fact: format must be 'tt' or 'tk', got {self.format!r}")
        positive_int(self.name, "rank", self.rank)
        number_in(self.name, "scale", self.scale, -math.inf, math.inf, low_open=True, high_open=True)
        number_in(self.name, "dropout", self.dropout, 0, 1, high_open=True)

    def apply_to(self, ctx: ApplyContext) -> None:
        _family, blocks = transformer_blocks(ctx, self, self.architectures)
        width = ctx.model.embed_dim
        factors = FacTFactors(width, self.rank, self.format, blocks[0][1].norm1.weight)
        owner = True
        for name, _block in blocks:
            # (sub-module, split along the input?)
            for site, split_input in (("attn.qkv", False), ("attn.proj", False),
                                      ("mlp.fc1", False), ("mlp.fc2", True)):
                linear = get_module(ctx.model, f"{name}.{site}")
                linear = linear.weighted_layer if isinstance(linear, AdapterLayer) else linear
                size = linear.in_features if split_input else linear.out_features
                other = linear.out_features if split_input else linear.in_features
                if not isinstance(linear, nn.Linear) or other != width or size % width:
                    raise ConfigError(
                        f"fact needs {name}.{site} to be a Linear made of {width}x{width} blocks; "
                        f"it is {type(linear).__name__} {linear.in_features}->{linear.out_features}")
                ctx.wrap(self, f"{name}.{site}", partial(
                    FacTLinear, factors=factors, fmt=self.format, slices=size // width,
                    split_input=split_input, scale=self.scale, dropout=self.dropout, owner=owner))
                owner = False
