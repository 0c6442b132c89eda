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
model.

Training takes the cheapest of equal forms per layer and batch (multiply-adds counted in
`training_form`; no SVD ever runs after apply):
- replace (both factors kept, W frozen, the layer's own op): y = U·(ReLU(σ+δ) ⊙ Vᵀx) + b in
  place of the frozen layer, W never read: 2·P·k·(m+n) for P positions against weight space's
  3·P·m·n + 2·m·n·k (ViT-B's Linears: 1.33x their frozen cost against 1.5x plus the rebuilds).
  At δ = 0 it equals the base layer within the fp32 rounding of U·diag(σ)·Vᵀ against W, not
  bitwise (tests/test_svdiff_forms.py); inference and the other forms are bitwise there;
- project (one factor kept, below): W's output or input through that factor;
- weight space: one call of the layer with W + ΔW, ΔW = (U * shift) @ Vᵀ (grouped convs; W trained);
- factored: layer(x) + U·(shift ⊙ Vᵀx) (nested in another adapter, few positions).

Factors kept (`factors`): U (m x k) and Vᵀ (k x n) together are k(m+n) values, more than W itself;
on SD-1.5 they were 4.3 GB over a 3.4 GB UNet. With "auto" (default) a conv (whose Vᵀ is as large
as W, U only 1/(k·k) of it) and a Linear more than ASPECT times wider than deep keep only the small
factor, as every layer does with "one": U when m <= n, else V; the other is implied by W = U·diag(σ)·Vᵀ:
    ΔW·x = U·diag(shift/σ)·Uᵀ·(W·x)     (U kept; the output of W projected)
    ΔW·x = W·V·diag(shift/σ)·Vᵀ·x       (V kept; the input projected)
W stays bitwise (identity at δ = 0, exact unmerge). Dividing by σ costs accuracy in ill-conditioned
directions: the error relative to the output is ~ε_fp32·max|shift_i|/σ_i, so one factor is kept
only where σ_max/σ_min <= CONDITION_LIMIT (1e3: <= ~1e-4 relative when |shift| ~ σ_max);
other layers keep both ("both": every layer, the fastest to train). Totals on SD-1.5 (UNet, its
factors and δ; tests/test_svdiff_memory.py), counted as if every layer were well-conditioned:
2.26x the UNet with "both", 1.46x "auto", 1.26x "one"; with the real SVDs of a random-init UNet
"auto" measured 1.49x (its ill-conditioned layers keep both factors).
A layer with one factor follows W if W itself trains (its ΔW is defined through W).

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
from functools import partial
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
FACTORS = ("auto", "both", "one")
ASPECT = 4  # auto: a Linear keeps both up to 4:1, where `replace` saves >= 1/6 of its training flops
CONDITION_LIMIT = 1e3  # one factor only where σ_max/σ_min <= this (module docstring)
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


def keeps(m: int, n: int, s: Tensor, factors: str, conv: bool) -> tuple[bool, bool]:
    """(keep U, keep Vᵀ) for an m x n weight with singular values `s` (descending): both, or only
    the smaller factor where `factors` allows it and σ_max/σ_min <= CONDITION_LIMIT."""
    if factors not in FACTORS:
        raise ValueError(f"svdiff: factors={factors!r}; use one of {FACTORS}")
    one = factors == "one" or (factors == "auto" and (conv or max(m, n) > ASPECT * min(m, n)))
    if one and s.device.type != "meta":  # meta (shapes only, e.g. sizing SD-1.5): as if well-conditioned
        one = bool(s[-1] * CONDITION_LIMIT >= s[0] > 0)
    return (m <= n, m > n) if one else (True, True)


class SpectralShift(AdditiveDeltaLayer):
    """δ on the singular values of a Linear/Conv weight, or added to a norm's weight."""

    stash_on_merge = True  # unmerge restores W bitwise (module docstring)

    def __init__(self, base_layer: nn.Module, factors: str = "auto") -> None:
        super().__init__(base_layer)
        weight = self.weighted_layer.weight.detach()
        if isinstance(self.weighted_layer, _NORMS):
            self.svd_delta = nn.Parameter(torch.zeros(weight.shape, **like_kwargs(weight)))  # (C,) or normalized_shape
            self.svd_u = self.svd_s = self.svd_vh = None
            return
        mat = rearrange(weight, "o ... -> o (...)")  # (C_out, C_in/g·k·k); a Linear's stays (out, in)
        exact = mat if mat.dtype in (torch.float32, torch.float64) else mat.float()  # no half SVD
        u, s, vh = svd(exact)  # (m, k), (k,), (k, n)
        keep_u, keep_vh = keeps(*mat.shape, s, factors, isinstance(self.weighted_layer, _CONVS))
        # recomputed from the base weight whenever the method is applied, so never saved;
        # contiguous: LAPACK's column-major U and Vᵀ make every conv with them ~10x slower
        for name, t, keep in (("svd_u", u, keep_u), ("svd_s", s, True), ("svd_vh", vh, keep_vh)):
            self.register_buffer(name, t.to(weight.dtype).contiguous() if keep else None, persistent=False)
        self.svd_delta = nn.Parameter(torch.zeros(self.svd_s.shape, **like_kwargs(weight)))  # (k,)

    def _shift(self) -> Tensor:  # in the factors' (the base's) dtype: δ may be fp32 on a half base
        return (F.relu(self.svd_s + self.svd_delta) - self.svd_s).to(self.svd_s.dtype)  # (k,), 0 at δ = 0

    def _mat(self) -> Tensor:  # W as (m, n), frozen
        w = self.weighted_layer.weight.detach()
        return w.reshape(w.shape[0], -1)

    def factors(self) -> tuple[Tensor, Tensor]:
        """U (m, k) and Vᵀ (k, n); a dropped one rebuilt from W (m·n·k): Vᵀ = Σ⁻¹·Uᵀ·W, U = W·V·Σ⁻¹."""
        u, vh, s = self.svd_u, self.svd_vh, self.svd_s
        if vh is None:
            return u, (u.T @ self._mat()) / s[:, None]
        if u is None:
            return (self._mat() @ vh.T) / s, vh
        return u, vh

    def delta_weight(self) -> Tensor:
        if self.svd_s is None:  # norm weight: additive
            return self.svd_delta.to(self.weighted_layer.weight.dtype)
        u, vh = self.factors()
        return ((u * self._shift()) @ vh).view(self.weighted_layer.weight.shape)

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
        form = "weight" if self.svd_s is None else self.training_form(x, direct)
        if form == "replace":
            return self._replaced(x)
        if form == "project":
            return self._projected(x, direct, *args, **kwargs)
        if form == "factored":
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

    def training_form(self, x: Tensor, direct: bool) -> str:
        """The cheapest way to train δ on input `x`: "replace", "project", "factored" or "weight".
        Multiply-adds, forward + backward, beyond the frozen layer's forward and input gradient
        (2·P·m·n for P output positions): weight space rebuilds ΔW (m·n·k, twice with δ's
        gradient) and makes the layer compute its weight gradient (P·m·n); factored runs x through
        Vᵀ and U (P·k·(m+n), twice with the input gradient); replace runs only those, in place of
        the frozen layer; project (one factor kept) runs W's output or input through it (2·P·k², twice)."""
        layer = self.weighted_layer
        if getattr(layer, "groups", 1) != 1:  # Vᵀ's rows mix the groups' inputs: weight space only
            return "weight"
        m, n, k = *self._mat().shape, self.svd_s.numel()
        if self.svd_u is None or self.svd_vh is None:  # one factor: the other would cost m·n·k
            return "project" if self.svd_vh is None or isinstance(layer, nn.Linear) else "weight"
        positions = x.numel() // (n // math.prod(getattr(layer, "kernel_size", ())))
        positions //= math.prod(getattr(layer, "stride", ()))  # output positions (roughly)
        cost = {"weight": positions * m * n * (1 if direct else 3) + 2 * m * n * k,
                "factored": 2 * positions * k * (m + n)}
        if direct and not layer.weight.requires_grad:  # W's own gradient needs the layer's op
            cost["replace"] = cost["factored"] - 2 * positions * m * n
        return min(cost, key=cost.get)

    def _replaced(self, x: Tensor) -> Tensor:
        """U·(ReLU(σ+δ) ⊙ Vᵀx) + b: the shifted layer from its factors, W never read."""
        layer, u, vh = self.weighted_layer, self.svd_u, self.svd_vh
        sigma = F.relu(self.svd_s + self.svd_delta).to(self.svd_s.dtype)  # (k,)
        if isinstance(layer, nn.Linear):
            return F.linear(F.linear(x, vh) * sigma, u, layer.bias)  # (..., k) -> (..., m)
        z = layer._conv_forward(x, vh.view(-1, *layer.weight.shape[1:]), None)  # (B, k, *spatial')
        z = z * sigma.view(-1, *([1] * (z.dim() - 2)))
        pointwise = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[z.dim()]
        return pointwise(z, u.view(*u.shape, *([1] * (z.dim() - 2))), layer.bias)  # (B, m, *spatial')

    def _projected(self, x: Tensor, direct: bool, *args, **kwargs) -> Tensor:
        """One factor kept: U·diag(shift/σ)·Uᵀ applied to W's output (U kept; a conv's channels),
        or V·diag(shift/σ)·Vᵀ to a Linear's input (V kept), ΔW and the other factor never formed."""
        layer, ratio = self.weighted_layer, self._shift() / self.svd_s  # (k,); σ > 0 here (keeps)
        if self.svd_vh is None:  # z + U·(ratio ⊙ Uᵀz), z = W·x without the bias
            u = self.svd_u
            z = _run(layer, x, layer.weight, None)  # (..., m) or (B, m, *spatial')
            if isinstance(layer, nn.Linear):
                dz = F.linear(F.linear(z, u.T) * ratio, u)
            else:
                lift = u.view(*u.shape, *([1] * (z.dim() - 2)))  # (m, k, 1, ...): 1x1 convs
                pointwise = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[z.dim()]
                dz = pointwise(pointwise(z, lift.transpose(0, 1)) * ratio.view(-1, *([1] * (z.dim() - 2))), lift)
            if direct:
                bias = layer.bias
                if bias is not None and not isinstance(layer, nn.Linear):
                    bias = bias.view(-1, *([1] * (z.dim() - 2)))  # (m, 1, ...)
                return z + dz if bias is None else z + dz + bias
            return self.base_layer(x, *args, **kwargs) + dz
        vh = self.svd_vh  # Linear: W·(x + V·(ratio ⊙ Vᵀx))
        dx = F.linear(F.linear(x, vh) * ratio, vh.T)  # (..., n)
        if direct:
            return F.linear(x + dx, layer.weight, layer.bias)
        return self.base_layer(x, *args, **kwargs) + F.linear(dx, layer.weight)

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
        u, vh = self.factors()  # before W changes: a dropped factor is rebuilt from W
        mat = weight.view(u.shape[0], -1)  # (m, n), in place: W += U·diag(shift)·Vᵀ
        mat.addmm_(u * self._shift(), vh, alpha=sign)


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
    factors: str = "auto"  # "both", "one" or "auto": the SVD factors kept per layer (module docstring)

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
        if self.factors not in FACTORS:
            raise ValueError(f"svdiff: factors={self.factors!r}; use one of {FACTORS}")
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
            ctx.wrap(self, name, partial(SpectralShift, factors=self.factors))
