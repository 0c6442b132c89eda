"""Sparse delta layers: train k chosen entries of existing weight tensors (SH-PEFT, SPT).

The trained state of one tensor W is a values vector (k,) and its flat indices (k,), never a
dense mask: gradients, optimizer state and the saved adapter grow with k, not with W.

1. autograd Functions for Linear and Conv: W + Δ is built for the product and dropped, and rebuilt
   in backward (a weight-sized temporary per layer, never one kept alive for backward); the
   values' gradient is a sampled matmul at the chosen entries for Linear;
2. SparseDeltaLayer, the AdapterLayer holding the deltas of one module's tensors.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError, CorruptAdapterError
from ..layers import AdapterLayer, like_kwargs

# Below this share of a Linear weight, the values' gradient is a sampled matmul at the chosen
# entries; above it a dense weight gradient is cheaper. Measured on CPU (1 thread, 788 rows of
# ViT-B activations): sampled beats dense up to 10% everywhere, crossing over at 12-15%.
SAMPLED_MAX_DENSITY = 0.10


def add_at(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """W + Δ as a new tensor, Δ holding `values` at the flat `indices` of W (out of place)."""
    return weight.reshape(-1).index_add(0, indices, values).view(weight.shape)


class SampledPattern:
    """The chosen entries of an (out, in) weight as a CSR pattern, built once per selection, for
    their gradient (gradᵀ·x at those entries) without the dense product.

    sampled_addmm dots rows of mat1 with columns of mat2, copying both so (mat1 contiguous, mat2
    transposed); the copy read per entry should be the one that stays in cache. With in > out
    (ViT's fc2: 768 x 3072) the pattern of Wᵀ is used instead, x as mat1 and grad as mat2:
    measured 7.5 -> 6.0 ms at 0.5% and 51 -> 32 ms at 10% of a 768 x 3072 weight (788 rows)."""

    def __init__(self, indices: Tensor, shape: torch.Size) -> None:
        out_features, in_features = shape
        rows = torch.div(indices, in_features, rounding_mode="floor")
        cols = indices - rows * in_features
        self.transposed = in_features > out_features
        self.inverse = None
        if self.transposed:  # the same entries in Wᵀ's row-major (CSR) order
            order = torch.argsort(cols * out_features + rows)
            rows, cols = cols[order], rows[order]
            self.inverse = torch.empty_like(order)
            self.inverse[order] = torch.arange(order.numel(), device=order.device)
            shape = torch.Size((in_features, out_features))
        self.shape, self.col = shape, cols
        self.crow = indices.new_zeros(shape[0] + 1)
        self.crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)

    def grad(self, grad: Tensor, x: Tensor) -> Tensor:
        """grad (M, out), x (M, in) -> (k,) in the order of the indices."""
        mat1, mat2 = (x.T, grad) if self.transposed else (grad.T, x)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            pattern = torch.sparse_csr_tensor(self.crow, self.col, grad.new_zeros(self.col.numel()),
                                              self.shape, check_invariants=False)  # checked on load
            values = torch.sparse.sampled_addmm(pattern, mat1, mat2, beta=0.0).values()  # (k,)
        return values if self.inverse is None else values[self.inverse]


def use_sampled(indices: Tensor, weight: Tensor) -> bool:
    return (weight.dtype in (torch.float32, torch.float64)
            and indices.numel() <= SAMPLED_MAX_DENSITY * weight.numel())


class _SparseLinear(torch.autograd.Function):
    """y = x·(W + Δ)ᵀ + b; returns gradients for x, values and b (and W only if it trains).
    `pattern`: the values' gradient as a sampled matmul (None: from the dense weight gradient)."""

    @staticmethod
    def forward(ctx, x, values, indices, weight, bias, pattern):
        need_x, need_v, _, need_w, _, _ = ctx.needs_input_grad
        ctx.pattern = pattern
        ctx.save_for_backward(x if (need_v or need_w) else None, values, indices, weight)
        return F.linear(x, add_at(weight, indices, values), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad):
        x, values, indices, weight = ctx.saved_tensors
        need_x, need_v, _, need_w, need_b, _ = ctx.needs_input_grad
        grad_x = grad_v = grad_w = grad_b = None
        if need_x:
            grad_x = grad @ add_at(weight, indices, values)  # (..., in)
        grad2 = grad.reshape(-1, grad.shape[-1])  # (M, out)
        if need_w or (need_v and ctx.pattern is None):
            grad_w = grad2.T @ x.reshape(-1, x.shape[-1])  # (out, in): dense only if needed
        if need_v:
            grad_v = (grad_w.reshape(-1)[indices] if grad_w is not None
                      else ctx.pattern.grad(grad2, x.reshape(-1, x.shape[-1])))
        if need_b:
            grad_b = grad2.sum(0)
        return grad_x, grad_v, None, grad_w if need_w else None, grad_b, None


class _SparseConv(torch.autograd.Function):
    """conv(x, W + Δ, b) for nn.Conv1d/2d/3d. The weight gradient of a conv is one dense
    convolution_backward (as in full fine-tuning); the values take their k entries of it."""

    @staticmethod
    def forward(ctx, x, values, indices, weight, bias, conv):
        ctx.conv = conv
        ctx.save_for_backward(x, values, indices, weight)
        return conv._conv_forward(x, add_at(weight, indices, values), bias)  # (B, out, *spatial)

    @staticmethod
    def backward(ctx, grad):
        x, values, indices, weight = ctx.saved_tensors
        conv = ctx.conv
        need_x, need_v, _, need_w, need_b, _ = ctx.needs_input_grad
        w = add_at(weight, indices, values)
        if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad, x, w, None, conv.stride, conv.padding, conv.dilation, False,
                [0] * len(conv.stride), conv.groups, [need_x, need_v or need_w, False])
        else:  # padding modes / 'same': differentiate a re-run of the conv
            with torch.enable_grad():
                x_ = x.detach().requires_grad_(need_x)
                w_ = w.detach().requires_grad_(True)
                inputs = (x_, w_) if need_x else (w_,)
                grads = torch.autograd.grad(conv._conv_forward(x_, w_, None), inputs, grad)
            grad_x, grad_w = grads if need_x else (None, grads[0])
        grad_v = grad_w.reshape(-1)[indices] if need_v else None
        grad_b = grad.sum(dim=(0, *range(2, grad.dim()))) if need_b else None
        return grad_x, grad_v, None, grad_w if need_w else None, grad_b, None


_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


def _fast_kind(layer: nn.Module) -> str:
    """'linear' / 'conv' for layers whose forward is exactly torch's, else '' (generic path)."""
    forward = type(layer).forward
    if isinstance(layer, nn.Linear) and forward is nn.Linear.forward:
        return "linear"
    if isinstance(layer, nn.modules.conv._ConvNd) and forward in _CONV_FORWARDS:
        return "conv"
    return ""


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


class SparseDeltaLayer(AdapterLayer):
    """Sparse additive deltas on some of the wrapped module's own tensors.

    Per adapted tensor p (`weight`, `bias`, a norm's or LayerScale's vector...):
      values_<p>   Parameter (k,), zero at init (identity)
      indices_<p>  persistent buffer (k,), int32 (int64 past 2³¹ entries): sorted unique flat
                   positions in p, saved in the adapter so a reload needs no data.
    Linear and Conv run through the Functions above; any other module runs its own forward
    with p + Δp swapped in (torch.func.functional_call). Merge writes W[i] + v into the k
    entries and keeps their old values, so unmerge restores W bitwise.
    """

    def __init__(self, base_layer: nn.Module, selection: dict[str, Tensor]) -> None:
        super().__init__(base_layer)
        layer = self.weighted_layer
        self.names = tuple(selection)
        self._checked: dict[str, tuple] = {}
        for name, idx in selection.items():
            param = layer._parameters[name]
            if not param.is_contiguous():
                raise ConfigError(f"sparse deltas need contiguous tensors; {name} of "
                                  f"{type(layer).__name__} is not")
            self.register_buffer(f"indices_{name}", idx.to(param.device, index_dtype(param.numel())))
            self.register_parameter(f"values_{name}", nn.Parameter(
                torch.zeros(idx.numel(), **like_kwargs(param))))

    # -- the deltas -------------------------------------------------------------------------
    def target(self, name: str) -> Tensor:
        return self.weighted_layer._parameters[name]

    def indices(self, name: str) -> Tensor:
        """The indices of `name`, checked once per change (e.g. after load_adapter's copy_)."""
        idx = getattr(self, f"indices_{name}")
        key = (id(idx), idx.data_ptr(), idx._version, idx.device)
        if self._checked.get(name) != key:
            numel = self.target(name).numel()
            ok = idx.dim() == 1 and not idx.is_floating_point()
            ok = ok and (idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < numel))
            ok = ok and bool((idx[1:] > idx[:-1]).all())
            if not ok:
                raise CorruptAdapterError(
                    f"indices_{name} of {type(self.weighted_layer).__name__} are not sorted unique "
                    f"positions in [0, {numel}): a config with a recorded selection only rebuilds "
                    "the layers and load_adapter fills them in; otherwise the adapter is corrupt")
            self._checked[name] = key
        return idx

    def sampled_pattern(self) -> SampledPattern:
        """The weight's selection as a CSR pattern, rebuilt only when its indices change."""
        idx = self.indices("weight")
        cached = getattr(self, "_pattern", None)
        if cached is None or cached[0] != self._checked["weight"]:
            cached = self._pattern = (self._checked["weight"], SampledPattern(idx, self.target("weight").shape))
        return cached[1]

    def check_loaded(self) -> None:
        """Validate every index buffer now (load_adapter calls this after filling them)."""
        for name in self.names:
            self.indices(name)

    def values(self, name: str) -> Tensor:
        """Δp's values in p's dtype (they may be fp32 beside a half base; differentiable)."""
        return getattr(self, f"values_{name}").to(self.target(name).dtype)

    def effective(self, name: str) -> Tensor:
        """p + Δp (differentiable in the values)."""
        return add_at(self.target(name), self.indices(name), self.values(name))

    def forward(self, *args, **kwargs):
        layer = self.base_layer
        kind = "" if isinstance(layer, AdapterLayer) else _fast_kind(layer)
        if kind and "weight" in self.names and len(args) == 1 and not kwargs:
            bias = self.effective("bias") if "bias" in self.names else layer.bias
            values, idx = self.values("weight"), self.indices("weight")
            if kind == "linear":
                pattern = self.sampled_pattern() if use_sampled(idx, layer.weight) else None
                return _SparseLinear.apply(args[0], values, idx, layer.weight, bias, pattern)
            return _SparseConv.apply(args[0], values, idx, layer.weight, bias, layer)
        prefix = ""  # path from base_layer down to the user's layer, through nested adapters
        while isinstance(layer, AdapterLayer):
            prefix, layer = prefix + "base_layer.", layer.base_layer
        swapped = {prefix + name: self.effective(name) for name in self.names}
        return functional_call(self.base_layer, swapped, args, kwargs)

    # -- merge / unmerge (the shared AdapterLayer.merge): in place on the k entries, exact -------
    def merge_blocker(self) -> str:
        return ""  # p + Δp is what the forward swaps in, so any layer computes the merged function

    def merge_into(self, weight, bias):  # the adapted tensors by name, not only weight and bias
        for name in self.names:
            flat, idx = self.target(name).view(-1), self.indices(name)
            saved = flat[idx]  # (k,) a copy: what unmerge writes back
            flat[idx] = saved + self.values(name)  # the forward's W[i] + v, bitwise
            self.register_buffer(f"_saved_{name}", saved, persistent=False)

    def unmerge_from(self, weight, bias):  # the kept entries back: bitwise, k values per tensor
        for name in self.names:
            self.target(name).view(-1)[self.indices(name)] = getattr(self, f"_saved_{name}")
            self.register_buffer(f"_saved_{name}", None, persistent=False)

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{n}: {getattr(self, f'values_{n}').numel()}/{self.target(n).numel()}"
                          for n in self.names)
        return f"{super().extra_repr()}, {sizes}"
