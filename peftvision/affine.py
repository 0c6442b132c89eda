"""Per-channel affine y = γ ⊙ x (+ β) along an explicit channel axis, for SSF, DiffFit's scales...

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
from torch import Tensor


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
