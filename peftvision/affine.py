"""Per-channel affine y = γ ⊙ x (+ β) along an explicit channel axis: the `affine` function and
`ChannelAffineLayer`, the one adapter layer of SSF, DiffFit's scales and IA3 (forward, merge into
the wrapped layer's rows or columns, exact unmerge and the half-precision overflow check).

Autograd's `x * γ + β` keeps x for γ's gradient Σ dy ⊙ x. Here the output y is kept instead and
x = (y − β) / γ is rebuilt in backward: y is the input of the next layer (Linear, attention,
GELU), which keeps it anyway, so on a ViT block SSF stores 2 activations instead of 11. The
rebuilt x differs from x by fp32 rounding (relative error ~1e-7·(1 + |β| / |γ·x|)), so γ's
gradient matches autograd's to ~1e-6 relative; x's and β's gradients do not use x and are exact.
A γ with an exact zero cannot rebuild its channel: then x is kept as autograd would. Only for
channel-last (transformer) tensors: a y modified in place later (CNNs' ReLU(inplace=True)) would
make autograd refuse the backward, so NCHW tensors keep x.
Under torch.compile the plain expression is traced and inductor plans what to keep itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import AdapterLayer, scale_inverse_is_exact, scaled_rows_overflow


def _per_channel(v: Tensor, ndim: int, dim: int) -> Tensor:
    """(C,) -> broadcastable against a tensor of `ndim` dims whose channels are on `dim`."""
    if dim in (-1, ndim - 1):
        return v
    shape = [1] * ndim
    shape[dim] = -1
    return v.view(shape)  # e.g. (1, C, 1, 1) for NCHW


def _channel_sum(t: Tensor, dim: int) -> Tensor:
    """Sum over every axis but `dim`: (..., C, ...) -> (C,)."""
    dim = dim % t.dim()
    return t.sum(dim=[d for d in range(t.dim()) if d != dim])


class _Affine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, shift: Tensor | None, dim: int) -> Tensor:
        g = _per_channel(scale, x.dim(), dim)
        y = x * g if shift is None else torch.addcmul(_per_channel(shift, x.dim(), dim), x, g)
        ctx.dim, ctx.has_shift = dim, shift is not None
        keep_x = ctx.needs_input_grad[1] and bool((scale == 0).any())  # γ = 0: x not rebuildable
        if not ctx.needs_input_grad[1]:
            ctx.save_for_backward(scale)  # γ frozen: only dx = dy ⊙ γ needed
            ctx.kept = "none"
        elif keep_x:
            ctx.save_for_backward(scale, x)
            ctx.kept = "x"
        else:
            ctx.save_for_backward(scale, shift, y)  # y: shared with the next layer's saved input
            ctx.kept = "y"
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        dim = ctx.dim
        scale, *rest = ctx.saved_tensors
        g = _per_channel(scale, dy.dim(), dim)
        dx = dy * g if ctx.needs_input_grad[0] else None
        dscale = None
        if ctx.kept == "x":
            dscale = _channel_sum(dy * rest[0], dim)
        elif ctx.kept == "y":
            shift, y = rest
            x = y if shift is None else y - _per_channel(shift, y.dim(), dim)
            dscale = _channel_sum(dy * x, dim) / scale  # Σ dy ⊙ (y − β) / γ, divided once per channel
        dshift = _channel_sum(dy, dim) if ctx.has_shift and ctx.needs_input_grad[2] else None
        return dx, dscale, dshift, None


def affine(x: Tensor, scale: Tensor, shift: Tensor | None = None, dim: int = -1) -> Tensor:
    """γ ⊙ x + β with γ, β of shape (C,) on axis `dim` of x (-1: channel-last, 1: NCHW)."""
    # NCHW: CNNs often modify a layer's output in place (ReLU(inplace=True), `x += shortcut`),
    # which would overwrite a kept y: there autograd keeps x as usual
    channel_last = dim in (-1, x.dim() - 1)
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not channel_last:
        g = _per_channel(scale, x.dim(), dim)
        return x * g if shift is None else torch.addcmul(_per_channel(shift, x.dim(), dim), x, g)
    return _Affine.apply(x, scale, shift, dim)


class ChannelAffineLayer(AdapterLayer):
    """y = γ ⊙ layer(x) (+ β) on the wrapped layer's output channels, or y = layer(γ ⊙ x) on its
    input channels (`on_input`), along the activations' channel axis `channel_dim` (1: NCHW,
    -1: channel-last). Subclasses own the parameters (their names are checkpoint keys) and give
    them, over all the channels, through `affine_params`.

    Merge folds γ into the layer that `merge_layer` names: its rows (W' = diag(γ)·W,
    b' = γ ⊙ b + β) or, on the input, its columns (W' = W·diag(γ), b unchanged). Unmerge divides
    by γ, within rounding; a γ with a zero or tiny entry makes merge keep the exact weight
    instead (layers.py), so unmerge never divides by zero."""

    channel_dim: int = -1
    on_input: bool = False

    def affine_params(self) -> tuple[Tensor, Tensor | None]:
        """(γ, β or None), each (C,) over every channel of the side being scaled."""
        raise NotImplementedError

    def apply_affine(self, t: Tensor) -> Tensor:
        """γ ⊙ t + β in t's dtype (an fp32 adapter beside a half base computes in the base's)."""
        scale, shift = self.affine_params()
        return affine(t, scale.to(t.dtype), None if shift is None else shift.to(t.dtype), self.channel_dim)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.on_input:
            return self.base_layer(self.apply_affine(x), *args, **kwargs)
        return self.apply_affine(self.base_layer(x, *args, **kwargs))

    def needs_bias_to_merge(self) -> bool:
        return not self.on_input and self.affine_params()[1] is not None  # β needs a bias to go to

    def needs_stash(self) -> bool:  # dividing by a zero or tiny γ would not give W back
        return self.stash_on_merge or not scale_inverse_is_exact(self.affine_params()[0],
                                                                 self.merge_layer.weight.dtype)

    def _weight_axis(self, weight: Tensor) -> int:
        """The axis of `weight` that γ scales: columns (1) on the input; else rows, the last axis
        of a norm's weight (a LayerNorm's normalized_shape) and the first of a Linear/Conv's."""
        if self.on_input:
            return 1
        return -1 if isinstance(self.merge_layer, nn.LayerNorm) or weight.dim() == 1 else 0

    def merge_blocker(self) -> str:
        blocker = super().merge_blocker()
        if blocker:
            return blocker
        layer, label = self.merge_layer, self.method_name or type(self).__name__
        if self.on_input and getattr(layer, "groups", 1) != 1:
            return f"{label} on the input of a grouped {type(layer).__name__}"
        weight, axis = layer.weight, self._weight_axis(layer.weight)
        rows = weight.movedim(axis, 0) if axis > 0 else weight  # γ's axis first (a view)
        if scaled_rows_overflow(rows, self.affine_params()[0], rows_first=axis >= 0):
            return f"{label} into {type(layer).__name__} (γ·W overflows {weight.dtype})"
        return ""

    def merge_into(self, weight: Tensor, bias: Tensor | None) -> None:
        # in place, the products taken in the wider dtype and rounded once into W's
        scale, shift = self.affine_params()
        weight.mul_(_per_channel(scale, weight.dim(), self._weight_axis(weight)))
        if self.on_input or bias is None:
            return
        bias.mul_(scale)
        if shift is not None:
            bias.add_(shift)

    def unmerge_from(self, weight: Tensor, bias: Tensor | None) -> None:
        scale, shift = self.affine_params()
        weight.div_(_per_channel(scale, weight.dim(), self._weight_axis(weight)))
        if self.on_input or bias is None:
            return
        if shift is not None:
            bias.sub_(shift)
        bias.div_(scale)
