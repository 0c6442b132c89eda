"""LoRA (Hu et al., ICLR 2022): W0 + (alpha / r) · B · A with A Kaiming-uniform and B zero.

Linear, Conv (A has the base conv's geometry, B is 1x1) and fused qkv projections where only a
subset of q, k, v is adapted. Options from later papers:
- rsLoRA (Kalajdzievski 2023): scaling alpha / sqrt(r) instead of alpha / r;
- init="gaussian": A ~ N(0, 1/r²) (peft's "gaussian"), B zero;
- init="pissa" (Meng et al., NeurIPS 2024) / "olora" (Büyükakyüz 2024): A, B from the top-r SVD /
  QR of W0. The papers subtract s·B0·A0 from W0; we keep W0 untouched and subtract s·B0·A0 in the
  branch instead (same function, and unload gives back the user's weights bit for bit);
- use_dora=True: DoRA (methods/dora.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedArchitectureError
from ..layers import AdditiveDeltaLayer, like_kwargs
from ..quant import compute_like
from ..registry import ReportedCount, register_method
from ..targets import GENERIC, TargetSpec
from .base import ApplyContext, Method, MethodFacts, number_in, positive_int

QKV = "qkv"
INITS = ("kaiming", "gaussian", "pissa", "olora")


class LoRALayer(AdditiveDeltaLayer):
    """Shared parts: scaling, optional input dropout (no module at all when p == 0) and the
    frozen s·B0·A0 offset of PiSSA / OLoRA (buffers lora_A0, lora_B0; absent otherwise)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float,
                 rslora: bool = False) -> None:
        super().__init__(base_layer)
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def _drop(self, x: Tensor) -> Tensor:
        return x if self.dropout is None else self.dropout(x)

    @property
    def has_offset(self) -> bool:
        return "lora_A0" in self._buffers

    def init_weights(self, init: str) -> None:
        """Re-initialise A and B the way `init` says ("kaiming" is what __init__ did)."""
        if init == "gaussian":  # peft's "gaussian": std 1/r
            with torch.no_grad():
                self.lora_A.normal_(0.0, 1.0 / self.r)
        elif init in ("pissa", "olora"):
            self._init_principal(init)

    @torch.no_grad()
    def _init_principal(self, init: str) -> None:
        weight = self.weighted_layer.weight
        if getattr(self.weighted_layer, "groups", 1) != 1:
            raise ConfigError(f"lora: init={init!r} needs an ungrouped conv (groups=1)")
        w = weight.detach().float().reshape(weight.shape[0], -1)  # (out, in·k·k)
        if self.r > min(w.shape):
            raise ConfigError(f"lora: init={init!r} needs r <= min(out, in) = {min(w.shape)} of a "
                              f"{tuple(w.shape)} weight, got r={self.r}")
        if init == "pissa":  # W = U S Vh; B = U_r sqrt(S_r / s), A = sqrt(S_r / s) Vh_r
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            root = (sv[: self.r] / self.scaling).sqrt()  # (r,)
            b, a = u[:, : self.r] * root, root[:, None] * vh[: self.r]
        else:  # OLoRA: W = Q R; B = Q_r, A = R_r
            q, rr = torch.linalg.qr(w)
            b, a = q[:, : self.r], rr[: self.r]
        self.lora_A.copy_(a.reshape(self.lora_A.shape))  # (r, in) or (r, in, *k)
        self.lora_B.copy_(b.reshape(self.lora_B.shape))  # (out, r) or (out, r, 1, 1)
        self.register_buffer("lora_A0", self.lora_A.detach().clone())
        self.register_buffer("lora_B0", self.lora_B.detach().clone())

    def offset_weight(self) -> Tensor | None:
        """s·B0·A0 flattened to (out, in·k·k), or None without PiSSA / OLoRA."""
        if not self.has_offset:
            return None
        return (self.lora_B0.flatten(1) @ self.lora_A0.flatten(1)) * self.scaling


class LoRALinear(LoRALayer):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__(base_layer, r, alpha, dropout, rslora)
        base_layer = self.weighted_layer
        kw = like_kwargs(compute_like(base_layer))  # float even on a quantized (QLoRA) base
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)  # (..., out)
        return out + self.output_delta(x)

    def output_delta(self, x: Tensor) -> Tensor:
        return self.branch(x, self._drop(x))  # (..., out)

    def branch(self, x: Tensor, x_drop: Tensor) -> Tensor:
        """ΔW·x, the adapter's share of the output, in x's dtype; the trained factors see the
        dropped-out input `x_drop`, PiSSA / OLoRA's frozen offset the input itself."""
        low = F.linear(x_drop, self.lora_A.to(x.dtype))  # (..., r)
        delta = F.linear(low, self.lora_B.to(x.dtype))  # (..., out)
        if self.has_offset:  # exactly zero at init: the same ops on equal factors
            delta = delta - F.linear(F.linear(x, self.lora_A0.to(x.dtype)), self.lora_B0.to(x.dtype))
        return delta * self.scaling

    def delta_weight(self) -> Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        offset = self.offset_weight()
        return delta if offset is None else delta - offset

    def add_delta_(self, weight: Tensor, sign: float) -> None:
        # an fp32 adapter on an fp16 base (round once), or PiSSA / OLoRA's offset: build ΔW
        if weight.dtype != self.lora_A.dtype or self.has_offset:
            return super().add_delta_(weight, sign)
        weight.addmm_(self.lora_B, self.lora_A, alpha=sign * self.scaling)  # no (out, in) temporary


class LoRAFusedLinear(LoRALayer):
    """LoRA on chosen slices of a fused projection (timm's qkv: out = [q; k; v], each D wide)."""

    def __init__(self, base_layer: nn.Linear, parts: str, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__(base_layer, r, alpha, dropout, rslora)
        base_layer = self.weighted_layer
        if base_layer.out_features % len(QKV):
            raise ConfigError(f"fused qkv needs out_features divisible by 3, got {base_layer.out_features}")
        self.slots = [QKV.index(p) for p in parts]  # which thirds are adapted, in q, k, v order
        self.width = base_layer.out_features // len(QKV)
        kw = like_kwargs(compute_like(base_layer))  # float even on a quantized (QLoRA) base
        n = len(self.slots)
        self.lora_A = nn.Parameter(torch.empty(n, r, base_layer.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(n, self.width, r, **kw))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def init_weights(self, init: str) -> None:
        if init in ("pissa", "olora"):
            raise ConfigError(f"lora: init={init!r} decomposes a whole weight; with qkv_parts it "
                              "would need one per slice. Leave qkv_parts unset or use another init")
        super().init_weights(init)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)  # (..., 3D)
        return out + self.output_delta(x)

    def output_delta(self, x: Tensor) -> Tensor:
        low = F.linear(self._drop(x), rearrange(self.lora_A, "n r i -> (n r) i").to(x.dtype))  # (..., n*r)
        low = rearrange(low, "... (n r) -> ... n r", n=len(self.slots))  # (..., n, r)
        delta = torch.einsum("...nr,ndr->...nd", low, self.lora_B.to(low.dtype)) * self.scaling  # (..., n, D)
        return self._scatter(delta)  # (..., 3D)

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
        return rearrange(delta, "three d i -> (three d) i")  # (3D, in): q, k, v stacked

    def add_delta_(self, weight: Tensor, sign: float) -> None:
        if weight.dtype != self.lora_A.dtype or not weight.is_contiguous():
            return super().add_delta_(weight, sign)
        slots = weight.view(len(QKV), self.width, -1)  # (3, D, in): the q, k, v rows
        for i, slot in enumerate(self.slots):
            slots[slot].addmm_(self.lora_B[i], self.lora_A[i], alpha=sign * self.scaling)


class LoRAConv(LoRALayer):
    """Conv LoRA. `r` is the rank per group: A is a conv with the base's kernel, stride, padding,
    dilation and groups (g·r outputs), B a grouped 1x1 conv, so ΔW has the base weight's shape."""

    def __init__(self, base_layer: nn.modules.conv._ConvNd, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__(base_layer, r, alpha, dropout, rslora)
        base_layer = self.weighted_layer
        weight = base_layer.weight  # (out, in/g, *k)
        g, kw = base_layer.groups, like_kwargs(weight)
        self.lora_A = nn.Parameter(torch.empty(g * r, *weight.shape[1:], **kw))
        ones = (1,) * (weight.dim() - 2)
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], r, *ones, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._pointwise = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)  # (B, out, *spatial')
        return out + self.output_delta(x)

    def output_delta(self, x: Tensor) -> Tensor:
        return self.branch(x, self._drop(x))  # (B, out, *spatial')

    def branch(self, x: Tensor, x_drop: Tensor) -> Tensor:
        """ΔW * x, the adapter's share of the output (see LoRALinear.branch)."""
        base = self.weighted_layer
        low = base._conv_forward(x_drop, self.lora_A.to(x.dtype), None)  # (B, g*r, *spatial'): base geometry
        delta = self._pointwise(low, self.lora_B.to(low.dtype), groups=base.groups)  # (B, out, *spatial')
        if self.has_offset:  # PiSSA / OLoRA need groups == 1
            low0 = base._conv_forward(x, self.lora_A0.to(x.dtype), None)  # (B, r, *spatial')
            delta = delta - self._pointwise(low0, self.lora_B0.to(low0.dtype))
        return delta * self.scaling

    def delta_weight(self) -> Tensor:
        g = self.weighted_layer.groups
        a = rearrange(self.lora_A, "(g r) i ... -> g r (i ...)", g=g)  # (g, r, in/g·k·k)
        b = rearrange(self.lora_B, "(g o) r ... -> g o (r ...)", g=g)  # (g, out/g, r): 1x1 kernel
        delta = torch.bmm(b, a) * self.scaling  # (g, out/g, in/g·k·k)
        offset = self.offset_weight()
        if offset is not None:
            delta = delta - offset.reshape(delta.shape)
        return delta.reshape(self.weighted_layer.weight.shape)  # (out, in/g, *k)

    def add_delta_(self, weight: Tensor, sign: float) -> None:
        if weight.dtype != self.lora_A.dtype or not weight.is_contiguous() or self.has_offset:
            return super().add_delta_(weight, sign)
        g = self.weighted_layer.groups
        a = self.lora_A.reshape(g, self.r, -1)  # (g, r, in/g * k)
        b = self.lora_B.reshape(g, -1, self.r)  # (g, out/g, r)
        weight.view(g, b.shape[1], -1).baddbmm_(b, a, alpha=sign * self.scaling)  # in place


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
    use_rslora: bool = False  # scaling alpha / sqrt(r) (rsLoRA)
    use_dora: bool = False  # weight-decomposed LoRA (DoRA): a trained magnitude per output
    init: str = "kaiming"  # "kaiming", "gaussian", "pissa" or "olora"

    name: ClassVar[str] = "lora"
    kind: ClassVar[str] = "additive"
    architectures: ClassVar = (GENERIC,)
    placed: ClassVar[bool] = True  # defaults: the architecture registry (families.py)
    placement_of: ClassVar[str] = "lora"  # DoRA, a LoRA subclass, shares these
    summary: ClassVar[str] = "low-rank ΔW = (alpha/r)·B·A on Linear/Conv layers (ViT qkv by default)"
    paper: ClassVar[str] = "Hu et al., ICLR 2022"
    targets_hint: ClassVar[str] = "module names, a regex, or types such as nn.Linear"
    reported: ClassVar = tuple(  # r=16 on q and v reproduces them (docs/benchmarks.md)
        ReportedCount(model, figure, "Dutt et al., MIDL 2024, Table 6", (("r", 16), ("qkv_parts", "qv")))
        for model, figure in (("vit_base_patch16_224", "0.6M"), ("vit_large_patch16_224", "1.5M"),
                              ("vit_huge_patch14_224", "2.6M")))
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
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{self.name}: {flag} must be True or False, got {getattr(self, flag)!r}")
        if self.init not in INITS:
            raise ConfigError(f"{self.name}: init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.use_dora and self.qkv_slices() not in (None, QKV):
            raise ConfigError(f"{self.name}: DoRA normalises whole output rows; it cannot adapt only "
                              f"qkv_parts={self.qkv_parts!r}. Leave qkv_parts unset")

    def quantized_refusal(self) -> str:
        """QLoRA: the branch needs only the base layer's output, so plain LoRA runs on a
        bitsandbytes layer; DoRA and PiSSA / OLoRA read the float weight itself."""
        if self.use_dora:
            return "DoRA normalises the rows of W0 + ΔW, which needs the float weight"
        if self.init in ("pissa", "olora"):
            return f"init={self.init!r} decomposes the float weight"
        return ""

    def qkv_slices(self) -> str | None:
        """qkv_parts in q, k, v order ("V,q" -> "qv"), None when not given."""
        if self.qkv_parts is None:
            return None
        return "".join(sorted(self.qkv_parts.lower().replace(",", ""), key=QKV.index))

    def layer_classes(self) -> tuple[type[LoRALayer], type[LoRALayer]]:
        """(Linear class, Conv class) this config wraps with."""
        if self.use_dora:
            from .dora import DoRAConv, DoRALinear

            return DoRALinear, DoRAConv
        return LoRALinear, LoRAConv

    def apply_to(self, ctx: ApplyContext) -> None:
        spec = self.target_spec(ctx)
        alpha = float(self.alpha if self.alpha is not None else self.r)
        opts = dict(dropout=self.dropout, rslora=self.use_rslora)
        linear_cls, conv_cls = self.layer_classes()
        allowed = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        parts = self.qkv_slices()
        for name, module in ctx.find(self, spec, allowed=allowed):
            if isinstance(module, nn.Linear):
                fused = parts is not None and parts != QKV and name.endswith(QKV)
                if fused and ctx.architecture != GENERIC and "qkv-thirds" not in ctx.arch.traits:
                    raise UnsupportedArchitectureError(  # e.g. MaxxVit interleaves q, k, v per head
                        f"lora: qkv_parts={self.qkv_parts!r} needs a qkv laid out [q; k; v]; "
                        f"{type(ctx.model).__name__}'s is not. Leave qkv_parts unset to adapt all of it")
                factory = (
                    (lambda m: LoRAFusedLinear(m, parts, self.r, alpha, **opts)) if fused
                    else (lambda m: linear_cls(m, self.r, alpha, **opts))
                )
            else:
                factory = lambda m: conv_cls(m, self.r, alpha, **opts)  # noqa: E731
            ctx.wrap(self, name, lambda m, f=factory: _initialised(f(m), self.init))


def _initialised(layer: LoRALayer, init: str) -> LoRALayer:
    layer.init_weights(init)
    return layer
