"""OFT (Qiu et al., NeurIPS 2023): orthogonal fine-tuning, W' = W0 · Rᵀ with R block-diagonal
orthogonal, acting on each output unit's input side (a Linear row, a conv filter flattened to
in/g · k·k), so the angles between neurons are kept (hyperspherical energy).

Each block is a Cayley transform R_i = (I - Q_i)(I + Q_i)⁻¹ of a skew-symmetric Q_i whose upper
triangle is trained (b·(b-1)/2 numbers per block of size b), Q = 0 at init so R = I. Q -> -Q turns
this into the paper's (I + Q)(I - Q)⁻¹, the same set of rotations; this sign is peft's exact
(non-Neumann) Cayley, whose parameter layout it shares. Merging folds R into the weight; unmerge
multiplies by R (= (Rᵀ)⁻¹), both in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError
from ..layers import AdapterLayer, like_kwargs, weight_transform
from ..registry import register_method
from ..targets import (
    GENERIC,
    TargetSpec,
)
from .base import ApplyContext, Method, positive_int


def block_size_for(n: int, wanted: int) -> int:
    """The largest divisor of n that is <= wanted (OFT needs blocks that tile the input)."""
    return max(d for d in range(1, min(n, wanted) + 1) if n % d == 0)


class OFTLayer(AdapterLayer):
    reads_wrapped_layer = True  # rotates the user layer's weight: another adapter's layer is skipped

    def __init__(self, base_layer: nn.Module, block_size: int) -> None:
        if isinstance(base_layer, AdapterLayer):
            raise ConfigError("oft: the layer already has another adapter; OFT rotates the whole "
                              "weight, so apply oft first and the other method after it")
        super().__init__(base_layer)
        weight = self.weighted_layer.weight  # (out, in/g, *k)
        n = weight[0].numel()  # the rotated (input) side of every output unit
        self.block_size = block_size_for(n, block_size)
        self.blocks = n // self.block_size
        b = self.block_size
        # the upper triangles of the Q_i
        self.oft_R = nn.Parameter(torch.zeros(self.blocks, b * (b - 1) // 2, **like_kwargs(weight)))

    def rotation(self, dtype: torch.dtype | None = None) -> Tensor:
        """(blocks, b, b): R_i = (I - Q_i)(I + Q_i)⁻¹, in `dtype` (default: the adapter's, at
        least float32: torch solves no half-precision systems)."""
        if dtype is None:
            dtype = torch.promote_types(self.oft_R.dtype, torch.float32)
        vec = self.oft_R.to(dtype)
        b = self.block_size
        rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
        q = vec.new_zeros(self.blocks, b, b)
        q[:, rows, cols] = vec
        q = q - q.transpose(1, 2)  # skew-symmetric
        eye = torch.eye(b, dtype=vec.dtype, device=vec.device).expand_as(q)
        return torch.linalg.solve(eye + q, eye - q, left=False)  # X (I + Q) = I - Q

    def _rotate(self, weight: Tensor, rot: Tensor, inverse: bool = False) -> Tensor:
        """W·Rᵀ (or W·R, the inverse) on the flattened input side of `weight`."""
        w = weight.reshape(weight.shape[0], self.blocks, self.block_size)  # (out, blocks, b)
        spec = "oik,ikc->oic" if inverse else "oik,ick->oic"
        return torch.einsum(spec, w, rot).reshape(weight.shape)

    @property
    def weight(self) -> Tensor:
        """W0·Rᵀ, for parents that read their child's `.weight` and run the op themselves (timm
        EVA, BEiT, Swin v2 qkv): they then compute the adapted result."""
        base = self.base_layer.weight
        if self.parent_reads_base():
            return base
        rot = self.rotation()
        return self._rotate(base.to(rot.dtype), rot).to(base.dtype)

    def forward(self, x: Tensor) -> Tensor:
        layer = self.weighted_layer
        rot = self.rotation()  # (blocks, b, b), float32 or wider
        weight = self._rotate(layer.weight.to(rot.dtype), rot).to(x.dtype)  # (out, in/g, *k)
        if weight_transform(layer):  # e.g. timm's StdConv2d: its own forward on the rotated weight
            return functional_call(layer, {"weight": weight}, (x,))
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, layer.bias)  # (..., out)
        return layer._conv_forward(x, weight, layer.bias)  # (B, out, *spatial')

    def merge_into(self, weight, bias):  # W0·Rᵀ; the bias is not rotated
        weight.copy_(self._rotate(weight.double(), self.rotation(torch.float64)))

    def unmerge_from(self, weight, bias):  # W'·R, R orthogonal to float64 rounding
        weight.copy_(self._rotate(weight.double(), self.rotation(torch.float64), inverse=True))


@register_method
@dataclass
class OFT(Method):
    """Orthogonal fine-tuning of Linear and Conv layers (block-diagonal Cayley rotations)."""

    block_size: int = 32  # per layer, the largest divisor of its input size up to this
    targets: TargetSpec = None

    name: ClassVar[str] = "oft"
    kind: ClassVar[str] = "additive"
    architectures: ClassVar = (GENERIC,)
    placed: ClassVar[bool] = True
    placement_of: ClassVar[str] = "lora"  # LoRA's default targets on every family (families.py)
    summary: ClassVar[str] = "W0·Rᵀ, R block-diagonal orthogonal (Cayley) on Linear/Conv layers (ViT qkv by default)"
    paper: ClassVar[str] = "Qiu et al., NeurIPS 2023"
    targets_hint: ClassVar[str] = "module names, a regex, or types such as nn.Linear"

    def validate(self) -> None:
        positive_int(self.name, "block_size", self.block_size)
        if self.block_size < 2:
            raise ConfigError("oft: block_size must be at least 2 (a 1x1 rotation is the identity)")

    def apply_to(self, ctx: ApplyContext) -> None:
        allowed = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        for name, _ in ctx.find(self, self.target_spec(ctx), allowed=allowed):
            ctx.wrap(self, name, lambda m: OFTLayer(m, self.block_size))
