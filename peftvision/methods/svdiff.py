"""SV-Diff (Han et al., ICCV 2023): train shifts of the singular values of the frozen weights.

For a Linear or Conv weight W (a conv reshaped to C_out x (C_in/groups·k·k), as the reference):
    W = U·diag(σ)·Vᵀ   (computed once at apply/load time, kept as non-persistent buffers)
    W' = U·diag(ReLU(σ + δ))·Vᵀ,   δ trainable, zero init, one value per singular value.
Norm weights (LayerNorm, GroupNorm) get an additive δ instead: w' = w + δ.

The reference (phymhan/SVDiff) shifts every module with a weight: on a UNet every Linear, Conv,
GroupNorm and LayerNorm, which is our default. We add the shift as a delta,
    W' = W + U·diag(ReLU(σ + δ) − σ)·Vᵀ,
rather than rebuilding U·diag(·)·Vᵀ (whose product differs from W by fp32 rounding): the delta
is exactly zero at δ = 0 (σ ≥ 0, so ReLU(σ) − σ = 0) and the model starts exactly as the base
model. Each call takes the cheaper of two equal forms (no SVD ever runs after apply):
- weight space: one call of the layer with W + ΔW, ΔW = (U * shift) @ Vᵀ (wide inputs);
- factored: layer(x) + U·(shift ⊙ Vᵀx), ΔW never formed (few positions, e.g. a UNet's deep
  levels: at 4x4 positions, rebuilding a 1280 x 11520 ΔW costs ~80x the conv itself).

The SVD runs once per apply (a progress bar on a terminal); set PEFTVISION_SVD_CACHE=<folder> to
keep the factors on disk, keyed by a hash of each base weight, so that load_adapter onto the same
base model reads them instead of recomputing (SD-1.5's UNet: minutes of SVD on a CPU).

Without gradients (inference) W + ΔW is built once and reused until δ or W change (their
_version counters and storage are the key), so the unmerged model runs at the base model's cost
and holds one more copy of each shifted weight; a forward with gradients frees that copy.

Merge writes W + ΔW and keeps W in a non-persistent buffer so that unmerge restores the original
weight bitwise ((W + ΔW) − ΔW is not W in floating point); a merged model therefore holds one
extra copy of each shifted weight until it is unmerged or unloaded.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..errors import UnsupportedArchitectureError
from ..layers import AdditiveDeltaLayer, like_kwargs
from ..progress import progress
from ..registry import register_method
from ..surgery import BiasDecoupledConv1d, BiasDecoupledConv2d, BiasDecoupledConv3d
from ..targets import GENERIC, TargetSpec
from .base import ApplyContext, Method, MethodFacts
from .ssf import channel_dim, plain_norm_forward

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm)
SVDIFF_LAYERS = (nn.Linear, *_CONVS, *_NORMS)
# Layers whose forward is exactly `_run` below, so the shifted weight can replace W in one call.
_PLAIN_FORWARDS = {t.forward for t in (*SVDIFF_LAYERS, BiasDecoupledConv1d, BiasDecoupledConv2d,
                                       BiasDecoupledConv3d)}


def _run(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`layer`'s operation with another weight and bias. For a norm with bias=None and weight=δ
    this is δ ⊙ x̂ (x̂ the normalised input), the norm's output change for w -> w + δ."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, weight, bias, layer.eps)
    return layer._conv_forward(x, weight, bias)  # Conv: the layer's stride, padding, groups...


SVD_CACHE_ENV = "PEFTVISION_SVD_CACHE"  # a folder: opt-in on-disk cache of the base weights' SVDs


def svd(mat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U, σ, Vᵀ of `mat` (m, n), thin. With $PEFTVISION_SVD_CACHE set, read from / written to
    <folder>/<sha256 of mat's bytes, dtype and shape>.safetensors, so applying SV-Diff again to the
    same base weights (load_adapter) skips the SVD; a damaged entry is recomputed."""
    folder = os.environ.get(SVD_CACHE_ENV)
    if not folder:
        return torch.linalg.svd(mat, full_matrices=False)
    from safetensors.torch import load_file, save_file

    host = mat.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{host.dtype}{tuple(host.shape)}".encode())
    digest.update(host.view(torch.uint8).numpy().tobytes() if host.numel() else b"")
    path = Path(folder) / f"{digest.hexdigest()}.safetensors"
    if path.is_file():
        try:
            t = load_file(path)
            return t["u"].to(mat.device), t["s"].to(mat.device), t["vh"].to(mat.device)
        except Exception:  # noqa: BLE001 - a truncated or foreign file: recompute and replace it
            pass
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({"u": u.contiguous().cpu(), "s": s.cpu(), "vh": vh.contiguous().cpu()}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return u, s, vh


class SpectralShift(AdditiveDeltaLayer):
    """δ on the singular values of a Linear/Conv weight, or added to a norm's weight."""

    stash_on_merge = True  # unmerge restores W bitwise (module docstring)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        weight = self.weighted_layer.weight.detach()
        if isinstance(self.weighted_layer, _NORMS):
            self.svd_delta = nn.Parameter(torch.zeros(weight.shape, **like_kwargs(weight)))  # (C,) or normalized_shape
            self.svd_u = self.svd_s = self.svd_vh = None
            return
        mat = rearrange(weight, "o ... -> o (...)")  # (C_out, C_in/g·k·k); a Linear's stays (out, in)
        exact = mat if mat.dtype in (torch.float32, torch.float64) else mat.float()  # no half SVD
        u, s, vh = svd(exact)  # (m, k), (k,), (k, n)
        # recomputed from the base weight whenever the method is applied, so never saved;
        # contiguous: LAPACK's column-major U and Vᵀ make every conv with them ~10x slower
        for name, t in (("svd_u", u), ("svd_s", s), ("svd_vh", vh)):
            self.register_buffer(name, t.to(weight.dtype).contiguous(), persistent=False)
        self.svd_delta = nn.Parameter(torch.zeros(self.svd_s.shape, **like_kwargs(weight)))  # (k,)

    def _shift(self) -> Tensor:  # in the factors' (the base's) dtype: δ may be fp32 on a half base
        return (F.relu(self.svd_s + self.svd_delta) - self.svd_s).to(self.svd_s.dtype)  # (k,), 0 at δ = 0

    def delta_weight(self) -> Tensor:
        if self.svd_s is None:  # norm weight: additive
            return self.svd_delta.to(self.weighted_layer.weight.dtype)
        return ((self.svd_u * self._shift()) @ self.svd_vh).view(self.weighted_layer.weight.shape)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        layer = self.weighted_layer
        direct = self.plain_base and type(layer).forward in _PLAIN_FORWARDS
        if self.svd_s is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            weight = self._inference_weight(direct)  # W' (or ΔW when nested), built once per δ
            if direct:
                return _run(layer, x, weight, layer.bias)
            return self.base_layer(x, *args, **kwargs) + _run(layer, x, weight, None)
        if getattr(self, "_cache", None) is not None:
            self._cache = None  # training: δ changes every step, free the inference copy
        if self.svd_s is not None and self.factored_is_cheaper(x, direct):
            return self.base_layer(x, *args, **kwargs) + self._factored_delta(x)
        if direct:  # one call of the layer's op with W' = W + ΔW
            return _run(layer, x, layer.weight + self.delta_weight(), layer.bias)
        # nested in another adapter (or an unusual layer subclass): add ΔW's own output
        return self.base_layer(x, *args, **kwargs) + _run(layer, x, self.delta_weight(), None)

    def _inference_weight(self, direct: bool) -> Tensor:
        """W + ΔW (direct) or ΔW, rebuilt only when δ, W or their storage changed: an optimizer
        step, load_state_dict or copy_ bumps a tensor's _version, `.to()` gives a new storage."""
        layer = self.weighted_layer
        key = tuple((t.data_ptr(), t._version) for t in (self.svd_delta, layer.weight)) + (direct,)
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != key:
            delta = self.delta_weight()
            cache = self._cache = (key, layer.weight + delta if direct else delta)
        return cache[1]

    def factored_is_cheaper(self, x: Tensor, direct: bool) -> bool:
        """Multiply-adds of the two ways to train δ, forward + backward, beyond the frozen layer:
        weight space rebuilds ΔW (m·n·k, twice with δ's gradient) and makes the layer compute its
        weight gradient (P·m·n for P output positions); factored runs x through Vᵀ and U (P·k·(m+n),
        twice with the input gradient). Deep UNet levels (few positions, wide layers) go factored."""
        layer = self.weighted_layer
        if getattr(layer, "groups", 1) != 1:  # Vᵀ's rows mix the groups' inputs: weight space only
            return False
        (k, n), m = self.svd_vh.shape, self.svd_u.shape[0]
        positions = x.numel() // (n // math.prod(getattr(layer, "kernel_size", ())))
        positions //= math.prod(getattr(layer, "stride", ()))  # output positions (roughly)
        weight_space = positions * m * n * (1 if direct else 3) + 2 * m * n * k
        return 2 * positions * k * (m + n) < weight_space

    def _factored_delta(self, x: Tensor) -> Tensor:
        """ΔW·x as x -> Vᵀ -> diag(shift) -> U, never forming ΔW (U, Vᵀ are frozen: no weight grads)."""
        layer, u, vh = self.weighted_layer, self.svd_u, self.svd_vh
        if isinstance(layer, nn.Linear):
            return F.linear(F.linear(x, vh) * self._shift(), u)  # (..., k) -> (..., m)
        z = layer._conv_forward(x, vh.view(-1, *layer.weight.shape[1:]), None)  # (B, k, *spatial')
        z = z * self._shift().view(-1, *([1] * (z.dim() - 2)))
        pointwise = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[z.dim()]
        return pointwise(z, u.view(*u.shape, *([1] * (z.dim() - 2))))  # 1x1 conv: (B, m, *spatial')

    def add_delta_(self, weight: Tensor, sign: float) -> None:
        if self.svd_s is None or not weight.is_contiguous():
            return super().add_delta_(weight, sign)
        mat = weight.view(self.svd_u.shape[0], -1)  # (m, n), in place: W += U·diag(shift)·Vᵀ
        mat.addmm_(self.svd_u * self._shift(), self.svd_vh, alpha=sign)


def svdiff_params(layer: nn.Module) -> int:
    """One δ per singular value of C_out x (C_in/g·k·k), or per entry of a norm's weight."""
    weight = layer.weight
    if isinstance(layer, _NORMS):
        return weight.numel()
    return min(weight.shape[0], weight[0].numel())


@register_method
@dataclass
class SVDiff(Method):
    """Spectral shifts of every Linear/Conv weight and additive shifts of norm weights."""

    targets: TargetSpec = None

    name: ClassVar[str] = "svdiff"
    aliases: ClassVar[tuple[str, ...]] = ("sv-diff",)
    kind: ClassVar[str] = "additive"
    architectures: ClassVar = (GENERIC,)
    summary: ClassVar[str] = "singular-value shifts W = U·diag(ReLU(σ+δ))·Vᵀ of Linear/Conv, δ on norm weights"
    paper: ClassVar[str] = "Han et al., ICCV 2023"
    targets_hint: ClassVar[str] = "e.g. [nn.Linear, nn.Conv2d, nn.GroupNorm]"
    test_facts: ClassVar = MethodFacts(params_per_layer=lambda cfg, layer: svdiff_params(layer.weighted_layer))

    def default_targets(self, ctx: ApplyContext) -> TargetSpec:
        return list(SVDIFF_LAYERS)  # every weight the reference shifts (BatchNorms excepted: below)

    def apply_to(self, ctx: ApplyContext) -> None:
        spec = self.target_spec(ctx)
        # BatchNorm is not offered: its train-mode statistics make w + δ need BN's own forward
        # a norm without affine has nothing to shift; timm's channel-first LayerNorm2d and its
        # norm+activation layers (GroupNormAct...) are not the F.layer_norm / group_norm of `_run`
        found = [(n, m) for n, m in ctx.find(self, spec, allowed=SVDIFF_LAYERS)
                 if getattr(m, "weight", None) is not None
                 and not (isinstance(m, _NORMS) and (plain_norm_forward(m) is not None
                                                     or isinstance(m, nn.LayerNorm) and channel_dim(m) == 1))]
        if not found:
            raise UnsupportedArchitectureError("svdiff: the matched layers have no weight to shift")
        # one SVD per layer at apply time: ~70 s on ViT-B on a CPU, minutes on SD-1.5
        for name, _module in progress(found, "svdiff: SVD of weights", unit="layer"):
            ctx.wrap(self, name, SpectralShift)
