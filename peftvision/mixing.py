"""add_weighted_adapter: a new LoRA adapter from a weighted combination of named adapters.

The combination types keep peft's names and maths (LoraModel.add_weighted_adapter), on the
adapters' effects ΔWᵢ = sᵢ·Bᵢ·Aᵢ (sᵢ their scaling, with set_scale's scale included):
- "cat": A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁, B₂, ...] at rank Σrᵢ, so ΔW = Σ wᵢ·ΔWᵢ exactly;
- "svd": Σ wᵢ·ΔWᵢ truncated to rank `svd_rank` (default: the largest source rank) by an SVD,
  B = U·S, A = Vh; exact when svd_rank ≥ the sum's rank;
- "linear": A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ (equal ranks): cheap, but the
  cross terms Bᵢ·Aⱼ make it only an approximation of Σ wᵢ·ΔWᵢ.
The new adapter is a plain LoRA with alpha = r (scaling 1), so the factors hold the whole ΔW.
Which layers: plain LoRA (rsLoRA and PiSSA / OLoRA's offset included) for every type; LoHa
and LoKr for "svd" only (their ΔW is not a product of two factors that "cat" or "linear" could
combine); DoRA never (m·(W+ΔW)/‖W+ΔW‖ is no sum of effects, so no combination of two DoRA
adapters is one of them scaled). What the adapters train in the user's model (the head, BatchNorm
statistics) becomes base + Σ wᵢ·(ownᵢ - base), the same task arithmetic on dense tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .layers import AdapterLayer
from .methods.dora import DoRAMixin
from .methods.loha import LoHaLayer
from .methods.lokr import LoKrLayer
from .methods.lora import QKV, LoRA, LoRAConv, LoRAFusedLinear, LoRALayer
from .named import _check_unmerged, _require, adapter_modules, check_adapter_name, check_known
from .state import AdapterSet
from .wrappers import unwrap

COMBINATIONS = ("svd", "cat", "linear")
# peft's other combination types (TIES, DARE, magnitude pruning): refused by name
PEFT_ONLY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
             "magnitude_prune", "magnitude_prune_svd")
SVD_ONLY = (LoHaLayer, LoKrLayer)  # dense ΔW: combined through its SVD


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float],
                         adapter_name: str, combination_type: str = "svd",
                         svd_rank: int | None = None) -> nn.Module:
    """Add adapter `adapter_name`: the weighted combination of the LoRA-type `adapters`.

    combination_type "cat" is exact (ΔW = Σ wᵢ·ΔWᵢ at rank Σrᵢ), "svd" (peft's default) the
    best rank-`svd_rank` approximation of that sum (default rank: the largest source rank),
    "linear" peft's weighted sum of the factors (equal ranks; an approximation). Weights may be
    negative. The new adapter is a normal named adapter (a LoRA with alpha = r): it starts
    inactive (peftvision.set_adapter), and saves, loads, merges and deletes like any other.
    Differences from peft: an existing `adapter_name` is an error (peft returns silently), a
    single source keeps the combination type asked for, rsLoRA sources mix exactly (peft 0.21
    keeps use_rslora with alpha = r on the mix, multiplying it by √r; fixed upstream in
    huggingface/peft#3449), and a head the sources train is
    combined as base + Σ wᵢ·(headᵢ - base) (peft gives the mix a fresh copy of the base head)."""
    from .api import apply
    from .named import delete_adapter

    wrapper, model = model, unwrap(model)
    found = _require(model, "add_weighted_adapter")
    sources, weights = _check_arguments(found, adapters, weights, adapter_name, combination_type, svd_rank)
    _check_unmerged(model, "add_weighted_adapter")
    by_module = _source_layers(model, sources)
    _check_layers(found, sources, by_module, combination_type)
    weighted = dict(zip(sources, weights))
    if combination_type == "svd":
        rank = svd_rank or max(_rank(layer) for layers in by_module.values() for layer in layers.values())
        parts = None  # ΔW of the whole layer: a plain LoRA, also on a fused qkv
    else:
        rank, parts = _cat_or_linear_rank(by_module, combination_type)
    combine = {"svd": _svd, "cat": _cat, "linear": _linear}[combination_type]
    factors = {name: combine(layers, weighted, rank) for name, layers in by_module.items()}
    dense = _combined_user_tensors(found, weighted)
    loras = [m for s in sources for m in found.states[s].methods if m.name == "lora"]
    config = LoRA(r=rank, alpha=float(rank), dropout=loras[0].dropout if loras else 0.0,
                  targets=_exactly(by_module), qkv_parts=parts)
    dtype = _common_dtype(layer for layers in by_module.values() for layer in layers.values())
    apply(model, config, adapter_name=adapter_name, adapter_dtype=dtype)
    try:
        _install(model, found, adapter_name, factors, dense)
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    return wrapper


# -- checks --------------------------------------------------------------------------------------
def _check_arguments(found: AdapterSet, adapters, weights, adapter_name, combination_type,
                     svd_rank) -> tuple[list[str], list[float]]:
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters \
            or not all(isinstance(a, str) for a in adapters):
        raise ConfigError(f"add_weighted_adapter: adapters must be a non-empty list of adapter names, "
                          f"got {adapters!r}; adapters: {list(found.states)}")
    check_known(found, adapters, "add_weighted_adapter")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) \
            or len(weights) != len(adapters) \
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                       for w in weights):
        raise ConfigError(f"add_weighted_adapter: weights must be one finite number per adapter "
                          f"({len(adapters)}), got {weights!r}")
    if not isinstance(adapter_name, str):
        raise ConfigError(f"add_weighted_adapter: adapter_name must name the new adapter, got {adapter_name!r}")
    check_adapter_name(adapter_name, None)
    if adapter_name in found.states:
        raise ConfigError(f"add_weighted_adapter: adapter {adapter_name!r} already exists; choose a "
                          "new name or delete_adapter it first")
    if combination_type in PEFT_ONLY:
        raise ConfigError(f"add_weighted_adapter: combination_type={combination_type!r} (peft's TIES / "
                          f"DARE / magnitude pruning) is not in peftvision; use one of {COMBINATIONS}")
    if combination_type not in COMBINATIONS:
        raise ConfigError(f"add_weighted_adapter: combination_type must be one of {COMBINATIONS}, "
                          f"got {combination_type!r}")
    if svd_rank is not None and (combination_type != "svd" or not isinstance(svd_rank, int)
                                 or isinstance(svd_rank, bool) or svd_rank < 1):
        raise ConfigError(f"add_weighted_adapter: svd_rank must be a positive integer, with "
                          f"combination_type='svd' only; got svd_rank={svd_rank!r} with "
                          f"combination_type={combination_type!r}")
    return list(adapters), [float(w) for w in weights]


def _source_layers(model: nn.Module, sources: list[str]) -> dict[str, dict[str, AdapterLayer]]:
    """canonical module name -> source adapter -> its layer there (one per adapter and module)."""
    by_module: dict[str, dict[str, AdapterLayer]] = {}
    for canonical, layer in _layers(model):
        if layer.adapter_name not in sources:
            continue
        here = by_module.setdefault(canonical, {})
        if layer.adapter_name in here:
            raise ConfigError(f"add_weighted_adapter: adapter {layer.adapter_name!r} has two layers on "
                              f"{canonical} ({here[layer.adapter_name].method_name} and "
                              f"{layer.method_name}); combine adapters with one LoRA-type method")
        here[layer.adapter_name] = layer
    return by_module


def _check_layers(found: AdapterSet, sources: list[str], by_module: dict, combination_type: str) -> None:
    for canonical, layers in by_module.items():
        for source, layer in layers.items():
            label = f"adapter {source!r} ({layer.method_name} on {canonical})"
            if isinstance(layer, DoRAMixin):
                raise ConfigError(
                    f"add_weighted_adapter: {label} is DoRA, whose output m·(W+ΔW)/‖W+ΔW‖ is no sum "
                    "of effects: a weighted combination of DoRA adapters is not defined. Combine "
                    "plain LoRA (with rsLoRA), LoHa or LoKr adapters")
            if isinstance(layer, SVD_ONLY) and combination_type != "svd":
                raise ConfigError(
                    f"add_weighted_adapter: {label}: a {layer.method_name} ΔW is not a product of two "
                    f"factors that combination_type={combination_type!r} could combine; use "
                    "combination_type='svd' (truncates Σ wᵢ·ΔWᵢ to svd_rank)")
            if not isinstance(layer, (LoRALayer, *SVD_ONLY)):
                raise ConfigError(
                    f"add_weighted_adapter: {label}: only LoRA-type adapters (LoRA with rsLoRA, and "
                    "LoHa / LoKr for combination_type='svd') can be combined")
    for source in sources:
        extra = [m.name for m in found.states[source].methods if m.name not in ("lora", "loha", "lokr")]
        if extra:
            raise ConfigError(f"add_weighted_adapter: adapter {source!r} also has {extra}, which "
                              "are not LoRA-type; combine adapters made of LoRA, LoHa or LoKr only")
    if not by_module:
        raise ConfigError("add_weighted_adapter: the adapters have no LoRA-type layers to combine")


def _cat_or_linear_rank(by_module: dict, combination_type: str) -> tuple[int, str | None]:
    """The new rank (Σ ranks for cat, the common rank for linear) and qkv_parts."""
    ranks = {}
    for layers in by_module.values():
        for source, layer in layers.items():
            if ranks.setdefault(source, _rank(layer)) != _rank(layer):
                raise ConfigError(f"add_weighted_adapter: adapter {source!r} has layers of several "
                                  "ranks; use combination_type='svd'")
    slots = {tuple(layer.slots) for layers in by_module.values() for layer in layers.values()
             if isinstance(layer, LoRAFusedLinear)}
    plain_qkv = any(name.endswith(QKV) and not isinstance(layer, LoRAFusedLinear)
                    for name, layers in by_module.items() for layer in layers.values())
    if len(slots) > 1 or (slots and plain_qkv):
        raise ConfigError(f"add_weighted_adapter: the adapters adapt different slices of qkv "
                          f"(qkv_parts); combination_type={combination_type!r} needs the same ones. "
                          "Use combination_type='svd', which adapts the whole qkv")
    parts = "".join(QKV[i] for i in next(iter(slots))) if slots else None
    if combination_type == "cat":
        return sum(ranks.values()), parts
    if len(set(ranks.values())) > 1:
        raise ConfigError(f"add_weighted_adapter: combination_type='linear' needs adapters of one rank, "
                          f"got {ranks}; use 'cat' (exact) or 'svd'")
    return next(iter(ranks.values())), parts


# -- the maths -----------------------------------------------------------------------------------
# Factors are handled grouped: A (g, R, ...) and B (g, ..., R) with g the conv groups (1 for a
# Linear) or a fused qkv's adapted slices, so every combination acts on the rank dims 1 and -1.

def _rank(layer: AdapterLayer) -> int:
    """The rank of a LoRA layer's stored factors (2r with PiSSA / OLoRA's offset); r otherwise."""
    if isinstance(layer, LoRALayer) and layer.has_offset:
        return 2 * layer.r
    return layer.r


def _factors(layer: LoRALayer) -> tuple[Tensor, Tensor]:
    """(A, B) grouped, with ΔW = scaling·B·A per group."""
    from .interop.peft_lora import _factors as stacked

    a, b = stacked(layer)  # PiSSA / OLoRA: [A; A0], [B, -B0] at rank 2r
    if isinstance(layer, LoRAFusedLinear):
        return a, b  # (n, r, in), (n, D, r)
    g = layer.weighted_layer.groups if isinstance(layer, LoRAConv) else 1
    # A (g·r, in/g, *k) -> (g, r, in/g, *k); B (out, r, *1) -> (g, out/g, *1, r)
    return a.reshape(g, -1, *a.shape[1:]), b.reshape(g, -1, *b.shape[1:]).movedim(2, -1)


def _cat(layers: dict[str, LoRALayer], weighted: dict[str, float], rank: int) -> tuple[Tensor, Tensor]:
    """A = [wᵢsᵢAᵢ], B = [Bᵢ] along the rank in source order; a source with no layer here
    keeps its share of the rank as zeros (at the end), so every module has rank Σrᵢ."""
    blocks_a, blocks_b = [], []
    for source, weight in weighted.items():
        layer = layers.get(source)
        if layer is not None:
            a, b = _factors(layer)
            blocks_a.append(a * (weight * layer.scaling))
            blocks_b.append(b)
    return _pad(torch.cat(blocks_a, dim=1), torch.cat(blocks_b, dim=-1), rank)


def _linear(layers: dict[str, LoRALayer], weighted: dict[str, float], rank: int) -> tuple[Tensor, Tensor]:
    """A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ (the sign on A only, or two negative
    weights would cancel)."""
    total_a = total_b = 0
    for source, weight in weighted.items():
        layer = layers.get(source)
        if layer is not None:
            a, b = _factors(layer)
            ws = weight * layer.scaling
            root = math.sqrt(abs(ws))
            total_a = total_a + a * math.copysign(root, ws)
            total_b = total_b + b * root
    return total_a, total_b


def _svd(layers: dict[str, AdapterLayer], weighted: dict[str, float], rank: int) -> tuple[Tensor, Tensor]:
    """The top-`rank` SVD of Σ wᵢ·ΔWᵢ as grouped plain-LoRA factors, B = U·S and A = Vh, per
    conv group (a grouped conv's ΔW is block-diagonal); zeros past the sum's own rank."""
    total = None
    for source, weight in weighted.items():
        layer = layers.get(source)
        if layer is not None:
            delta = layer.delta_weight().detach() * weight  # the base weight's shape
            total = delta if total is None else total + delta
    base = next(iter(layers.values())).weighted_layer
    g = getattr(base, "groups", 1)
    work = total.float() if total.dtype in (torch.float16, torch.bfloat16) else total
    u, s, vh = torch.linalg.svd(work.reshape(g, total.shape[0] // g, -1), full_matrices=False)
    keep = min(rank, s.shape[-1])  # u (g, out/g, k), s (g, k), vh (g, k, in/g·k·k)
    b = u[..., :keep] * s[:, None, :keep]  # (g, out/g, keep)
    a = vh[:, :keep]  # (g, keep, in/g·k·k)
    return _pad(a, b, rank)


def _pad(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad grouped factors to `rank` along the rank dims (A's 1, B's last)."""
    short = rank - a.shape[1]
    if short > 0:
        a = torch.cat([a, a.new_zeros(a.shape[0], short, *a.shape[2:])], dim=1)
        b = torch.cat([b, b.new_zeros(*b.shape[:-1], short)], dim=-1)
    return a, b


def _combined_user_tensors(found: AdapterSet, weighted: dict[str, float]) -> dict[str, Tensor]:
    """canonical -> base + Σ wᵢ·(ownᵢ - base) for every user tensor a source trains (the head,
    BatchNorm statistics); integer tensors (num_batches_tracked) take the first owner's value."""
    combined = {}
    for canonical, owners in found.banks.items():
        mine = [(owners[s], w) for s, w in weighted.items() if s in owners]
        if not mine:
            continue
        base = found.originals[canonical]
        if not base.is_floating_point():
            combined[canonical] = mine[0][0].detach().clone()
            continue
        total = base.clone()
        for tensor, weight in mine:
            total += (tensor.detach().to(base.dtype) - base) * weight
        if canonical.endswith("running_var") and bool((total < 0).any()):
            raise ConfigError(f"add_weighted_adapter: the weights {list(weighted.values())} give "
                              f"{canonical} negative BatchNorm variances; use weights whose "
                              "combination of the adapters' statistics stays positive (e.g. summing to 1)")
        combined[canonical] = total
    return combined


@torch.no_grad()
def _install(model: nn.Module, found: AdapterSet, name: str, factors: dict, dense: dict) -> None:
    for canonical, layer in _layers(model):
        if layer.adapter_name != name:
            continue
        a, b = factors[canonical]  # grouped
        if not isinstance(layer, LoRAFusedLinear):  # back to the layer's own layout
            a, b = a.flatten(0, 1), b.movedim(-1, 2).flatten(0, 1)  # (g·R, ...), (out, R, ...)
        layer.lora_A.copy_(a.reshape(layer.lora_A.shape))
        layer.lora_B.copy_(b.reshape(layer.lora_B.shape))
    for canonical, value in dense.items():
        own = found.banks[canonical].get(name)
        if own is not None:
            own.copy_(value)


def _layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(canonical module name, layer) of every adapter layer, nested ones included."""
    return ((name, m) for name, m in adapter_modules(model) if isinstance(m, AdapterLayer))


def _exactly(names) -> str:
    """A targets regex matching these module names and no other (a list entry also matches
    longer names ending in it)."""
    return "|".join(re.escape(n) for n in sorted(names))


def _common_dtype(layers) -> torch.dtype:
    dtype = None
    for layer in layers:
        for p in layer.parameters(recurse=False):
            dtype = p.dtype if dtype is None else torch.promote_types(dtype, p.dtype)
    return dtype or torch.float32
