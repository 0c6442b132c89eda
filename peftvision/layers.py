"""Adapter modules. Adapter parameters are found by structure: they live in `Adapter` modules.

`AdapterLayer` wraps one base layer (Linear, Conv, Norm...). A mergeable subclass describes its
effect on the base weight and bias through two in-place functions, `merge_into` and its inverse
`unmerge_from`; merge and unmerge are shared code built on them.

What unmerge restores (the one exact-unmerge mechanism, used by every method):
- a layer whose inverse is exact up to rounding (W + ΔW − ΔW, or (γ·W)/γ with γ not tiny) runs
  the inverse in place: the weight comes back within one rounding of the merged values
  (|error| ≤ eps·|merged value| + the dtype's smallest normal number);
- a layer whose inverse does not exist or is not exact in the layer's dtype (SSF / DiffFit / IA3
  with a zero or tiny scale γ, TSA's alignment β, which needs a matrix inverse) or that promises a
  bitwise unmerge (SV-Diff, SPT's LoRA) keeps a copy of the layer's weight and bias while merged
  (`needs_stash`), and unmerge writes that copy back bit for bit;
- a layer that changes only a few entries (SH-PEFT / SPT sparse deltas) keeps just those in its
  `merge_into` and writes them back in `unmerge_from`: bitwise, at k values per tensor.
Only `merge_into` / `unmerge_from` / `needs_stash` differ per method; `merge` and `unmerge` are
this file's, and a merged layer's forward is its base layer's (`_gate`).
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .errors import MergeError

HALF = (torch.float16, torch.bfloat16)


class Adapter(nn.Module):
    """Marker base class of every module peftvision inserts into a model."""

    method_name: str = ""
    adapter_name: str = "default"  # the named adapter it belongs to (set by ApplyContext.wrap)


# Forwards that use `weight` and `bias` exactly as stored, so a merged weight computes the merged
# function. timm's norm/linear subclasses are added when timm is loaded (see `_plain_forwards`).
_TORCH_PLAIN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm,
                nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm, nn.modules.instancenorm._InstanceNorm)
_TIMM_PLAIN = {"timm.layers.norm": ("LayerNorm", "LayerNorm2d", "GroupNorm", "GroupNorm1"),
               "timm.layers.linear": ("Linear",),
               # norm + activation in one forward: the norm uses its affine parameters as stored
               "timm.layers.norm_act": ("BatchNormAct2d", "SyncBatchNormAct", "GroupNormAct",
                                        "GroupNorm1Act", "LayerNormAct", "LayerNormAct2d")}


def _plain_forwards() -> set:
    forwards = {t.forward for t in _TORCH_PLAIN}
    for module_name, names in _TIMM_PLAIN.items():
        module = sys.modules.get(module_name)  # never import timm: its layers cannot exist otherwise
        forwards |= {getattr(module, n).forward for n in names if hasattr(module, n)}
    return forwards


def weight_transform(layer: nn.Module) -> str:
    """'' when `layer` computes with its stored weight as it is, else how it transforms it.

    Merging writes W' into `layer.weight`; a layer that standardises (timm's StdConv2d,
    ScaledStdConv2d), re-parametrises (torch.nn.utils.parametrize, weight_norm) or otherwise
    rewrites its weight in its own forward would then compute f(W') instead of the merged output."""
    name = type(layer).__name__
    if parametrize.is_parametrized(layer):
        return f"{name}'s weight is parametrized (torch.nn.utils.parametrize, e.g. weight_norm)"
    if any(isinstance(h, (WeightNorm, SpectralNorm)) for h in layer._forward_pre_hooks.values()):
        return f"{name} recomputes its weight before every forward (weight_norm / spectral_norm)"
    if type(layer).forward not in _plain_forwards():
        return (f"{name} has its own forward, which may transform its weight (e.g. timm's "
                "StdConv2d standardises it), so a merged weight would not give the adapted output")
    return ""


class AdapterLayer(Adapter):
    """Wraps `base_layer`; `forward` adds the adapter's effect.

    Each layer belongs to one named adapter (`adapter_name`). While that adapter is not active
    (peftvision.set_adapter / disable_adapters), or once it is merged into the base weights, the
    layer is its base layer: every subclass's `forward` is wrapped once, at class creation, by
    `_gate`, so a subclass writes only the adapted, unmerged forward. `route` is set only inside
    peftvision.adapter_per_sample (peftvision.routing)."""

    active: bool = True
    route = None  # per-sample routing of the batch, or None (see peftvision.routing)
    # Optional: `output_delta(x)` such that forward(x) == base_layer(x) + output_delta(x). Routing
    # then runs the base once on the whole batch and the delta on this adapter's samples only.
    # A subclass that redefines forward without redefining output_delta loses it (DoRA's forward
    # is not additive), so a stale delta can never be used.
    output_delta = None
    # True for a layer that computes from the wrapped user layer's parts instead of calling
    # base_layer (AdaptFormer/Convpass re-run the block: `runs_block`): another adapter's layer
    # below it must then be inactive, which set_adapter checks
    reads_wrapped_layer: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if forward is not None and "output_delta" not in cls.__dict__:
            cls.output_delta = None
        if forward is not None and not getattr(forward, "_gated", False):
            cls.forward = _gate(forward)

    mergeable: bool = True
    why_not_mergeable: str = ""
    # True: merge keeps the layer's exact weight and bias and unmerge writes them back bitwise
    # (costs one copy of the weight per merged layer while merged); see the module docstring.
    stash_on_merge: bool = False

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
    def plain_base(self) -> bool:
        """True when `base_layer` computes the user's layer alone: every adapter layer between
        them (of other named adapters) is inactive."""
        layer = self.base_layer
        while isinstance(layer, AdapterLayer):
            if layer.active:
                return False
            layer = layer.base_layer
        return True

    def parent_reads_base(self) -> bool:
        """For a `weight` property read by a parent that runs the op itself: True when it must
        see the base weight (merged, inactive, or routed with no sample of the batch using this
        adapter). Per-sample routing of a batch that mixes this adapter with others raises: one
        weight read by the parent serves every sample."""
        if self.merged or not self.active:
            return True
        return self.route is not None and not self.route.whole_batch_uses(self)

    @property
    def merge_layer(self) -> nn.Module:
        """The user layer whose weight and bias `merge` rewrites: the wrapped layer, unless the
        adapter folds into another one (DiffFit's branch scale on `attn1` folds into `to_out.0`)."""
        return self.weighted_layer

    # -- what a mergeable adapter implements -------------------------------------------------------
    def merge_into(self, weight: Tensor, bias: Tensor | None) -> None:
        """Rewrite the base `weight` and `bias` in place so that the base layer alone computes the
        adapted output (bias is None when the layer has none and `needs_bias_to_merge` is False)."""
        raise MergeError(f"{type(self).__name__} cannot be merged: {self.why_not_mergeable}")

    def unmerge_from(self, weight: Tensor, bias: Tensor | None) -> None:
        """The inverse of `merge_into`, in place. Never called when `needs_stash()` was True."""
        raise MergeError(f"{type(self).__name__} cannot be unmerged: {self.why_not_mergeable}")

    def needs_bias_to_merge(self) -> bool:
        """True when merging writes a bias into a base layer that may have none (e.g. a shift)."""
        return False

    def needs_stash(self) -> bool:
        """True when `unmerge_from` would not restore the weight within rounding in its dtype
        (or the method promises a bitwise unmerge): merge then keeps a copy to write back."""
        return self.stash_on_merge

    # -- shared merge / unmerge ------------------------------------------------------------------
    def merge_blocker(self) -> str:
        """Why this layer cannot merge, or '' when it can. Checked before any weight changes."""
        label = self.method_name or type(self).__name__
        if not self.mergeable:
            return f"{label} ({self.why_not_mergeable})"
        layer = self.merge_layer
        if getattr(layer, "weight", None) is None:
            return (f"{label} into {type(layer).__name__} (the layer "
                    "has no weight to fold it into, e.g. a norm without affine)")
        if not layer.weight.is_floating_point():  # bitsandbytes (QLoRA): see peftvision/quant.py
            from .quant import describe

            return (f"{label} into {describe(layer)}: W + ΔW would be re-quantized, rounding the "
                    "adapter's update away; to merge into float weights, call "
                    "peftvision.quant.dequantize(model) first")
        transform = weight_transform(layer)
        if transform:
            return f"{label} into {transform}"
        return ""

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        blocker = self.merge_blocker()
        if blocker:
            raise MergeError(f"cannot merge {blocker}")
        layer = self.merge_layer
        bias = getattr(layer, "bias", None)  # a layer may hold other tensors only (LayerScale's gamma)
        if self.needs_stash():  # the exact pre-merge values, restored by unmerge
            self.register_buffer("_stash_weight", layer.weight.detach().clone(), persistent=False)
            self.register_buffer("_stash_bias", None if bias is None else bias.detach().clone(),
                                 persistent=False)
        created_bias = bias is None and self.needs_bias_to_merge()
        if created_bias:  # a LayerNorm's bias has its weight's shape; others one value per output
            shape = layer.weight.shape if isinstance(layer, nn.LayerNorm) else layer.weight.shape[:1]
            layer.bias = nn.Parameter(layer.weight.new_zeros(shape), requires_grad=False)
        self.merge_into(getattr(layer, "weight", None), getattr(layer, "bias", None))
        self._created_bias = created_bias
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        layer = self.merge_layer
        stash = getattr(self, "_stash_weight", None)
        if stash is not None:
            layer.weight.copy_(stash)
            if self._stash_bias is not None:
                layer.bias.copy_(self._stash_bias)
            self._stash_weight = self._stash_bias = None  # free the copies
        else:
            self.unmerge_from(getattr(layer, "weight", None), getattr(layer, "bias", None))
        if getattr(self, "_created_bias", False):
            layer.bias = None  # the base layer had no bias before merge
        self.merged = False

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        name = "" if self.adapter_name == "default" else f"adapter={self.adapter_name!r}, "
        return f"{name}method={self.method_name!r}, merged={self.merged}" + ("" if self.active else ", inactive")


def _gate(forward):
    """An inactive or merged layer runs its base layer alone (merged: the base weights hold the
    adapter); a routed one splits the batch by adapter."""

    @functools.wraps(forward)
    def gated(self: AdapterLayer, *args, **kwargs):
        if self.merged or not self.active:
            return self.base_layer(*args, **kwargs)
        if self.route is not None:
            return self.route(self, forward, args, kwargs)
        return forward(self, *args, **kwargs)

    gated._gated = True
    return gated


def scale_inverse_is_exact(scale: Tensor, dtype: torch.dtype) -> bool:
    """True when (γ·w)/γ gives w back within rounding in `dtype` for every entry of γ: γ finite
    and |γ| ≥ eps(dtype). Then |error| ≤ eps·|w| + tiny, since an underflowed γ·w is off by at
    most the smallest subnormal, tiny·eps, which /γ makes at most tiny."""
    eps = torch.finfo(dtype).eps
    magnitude = scale.detach().abs()
    return bool(torch.isfinite(magnitude).all()) and bool((magnitude >= eps).all())


def scaled_rows_overflow(weight: Tensor, scale: Tensor, rows_first: bool = True) -> bool:
    """True when scaling `weight`'s output rows (dim 0; the last dim when not `rows_first`, a norm
    weight) by `scale` overflows a half-precision dtype: the merged weight would hold inf."""
    if weight.dtype not in HALF:
        return False  # fp32 overflows only past 3e38
    w = weight.detach()
    w = w.reshape(w.shape[0], -1) if rows_first and w.dim() > 1 else w.reshape(-1, scale.numel()).T
    low, high = torch.aminmax(w, dim=1)  # (C,): no weight-sized temporary
    largest = torch.maximum(low.abs(), high.abs()).float() * scale.detach().abs().float()
    return bool((largest > torch.finfo(weight.dtype).max).any())


class AdditiveDeltaLayer(AdapterLayer):
    """An adapter whose merge is W + ΔW (and b + Δb): subclasses implement `delta_weight`, or
    `add_delta_` where ΔW can be added without building it (e.g. LoRA's W.addmm_(B, A))."""

    @property
    def weight(self) -> Tensor:
        """The adapted weight W + ΔW, for parents that read their child's `.weight` and run the
        op themselves (timm EVA and BEiT: F.linear(x, self.qkv.weight, qkv_bias)): they then
        compute the adapted result, with gradients reaching the adapter."""
        weight = self.base_layer.weight  # a nested adapter's own adapted weight
        if self.parent_reads_base():
            return weight
        return weight + self.delta_weight().to(weight.dtype)

    def delta_weight(self) -> Tensor:
        raise NotImplementedError

    def delta_bias(self) -> Tensor | None:
        return None

    def add_delta_(self, weight: Tensor, sign: float) -> None:
        """weight += sign·ΔW in place (the sum taken in the wider dtype, then rounded once)."""
        weight.add_(self.delta_weight(), alpha=sign)

    def merge_into(self, weight, bias):
        self.add_delta_(weight, 1.0)
        delta_bias = self.delta_bias()
        if delta_bias is not None:
            bias.add_(delta_bias)

    def unmerge_from(self, weight, bias):
        self.add_delta_(weight, -1.0)
        delta_bias = self.delta_bias()
        if delta_bias is not None:
            bias.sub_(delta_bias)


class DenseDeltaLayer(AdditiveDeltaLayer):
    """An additive adapter whose ΔW is built densely (LoHa, LoKr) and applied with the wrapped
    layer's own op: F.linear, or the conv's stride, padding, padding mode, dilation and groups."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        return out + self.output_delta(x)

    def output_delta(self, x: Tensor) -> Tensor:
        layer = self.weighted_layer
        delta = self.delta_weight().to(x.dtype)  # the base weight's shape, in the activations' dtype
        if isinstance(layer, nn.Linear):
            return nn.functional.linear(x, delta)  # (..., out)
        return layer._conv_forward(x, delta, None)  # (B, out, *spatial')


# -- the dtype of new adapter parameters (apply's `adapter_dtype`) --------------------------------
_ADAPTER_DTYPE: ContextVar[torch.dtype | str | None] = ContextVar("adapter_dtype", default=None)


def adapter_dtype(like: Tensor) -> torch.dtype:
    """The dtype of a new trainable adapter parameter beside the base tensor `like`.

    apply(adapter_dtype=None) (default): float32 on a float16/bfloat16 base, so optimizers and
    torch.amp.GradScaler see fp32 parameters (the mixed-precision recipe), else the base dtype;
    "base": the base tensor's dtype; a torch dtype: that one. Forwards cast the adapter to the
    activations' dtype, so the layer computes in the base model's precision."""
    choice = _ADAPTER_DTYPE.get()
    if choice is None:
        return torch.float32 if like.dtype in HALF else like.dtype
    return like.dtype if choice == "base" else choice


@contextmanager
def adapter_dtype_scope(choice: torch.dtype | str | None):
    token = _ADAPTER_DTYPE.set(choice)
    try:
        yield
    finally:
        _ADAPTER_DTYPE.reset(token)


def like_kwargs(like: Tensor) -> dict:
    """dtype and device of a new adapter parameter beside `like` (see `adapter_dtype`)."""
    return {"dtype": adapter_dtype(like), "device": like.device}
