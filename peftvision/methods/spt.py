"""SPT (He et al., ICCV 2023, sensitivity-aware visual PEFT).

1. Sensitivity of every weight in scope: s(w) = Σ_b (∂E_b/∂w)² over the batches of `data`.
2. The budget: the top `fraction` (or `count`) of all weights in scope by s, one global ranking
   (ties to the earlier weight in model order). Call σ(T) the number of them in tensor T.
3. Per tensor T (the rule of the reference code, ziplab/SPT engine.get_sensitivity):
   - T is the weight W of a Linear (d_out × d_in) or Conv (C_out × C_in/g × k × k), and
     σ(T) ≥ cost(W) / α, where cost(W) is the parameter count of a rank-r LoRA on that layer:
     r·(d_in + d_out) for a Linear, r·(C_in·k·k + C_out) for a conv (methods/lora.py's shapes)
     -> W gets a LoRA module of rank r (structured tuning) and none of its entries train alone;
   - T is a vector of length d and σ(T) ≥ d / β -> all of T trains (its delta covers every entry);
   - otherwise -> the σ(T) chosen entries of T train (an unstructured sparse delta).
   α = 10, r = 8 as in the paper; β = 5 as in the reference code. A larger α / β makes the
   structured choice easier. The budget counts chosen weights, not trained parameters: a LoRA
   costs cost(W) whatever σ(W) was, so the trained count is reported by peftvision.report.
timm's ViT fuses q, k, v in one Linear: it is one matrix here (the reference splits it in three).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import register_method
from ..surgery import get_module
from .base import ApplyContext, number_in, positive_int
from .lora import LoRAConv, LoRALinear
from .sparse import SparseMethod
from .sparse_importance import accumulate_gradients, check_gradient, default_loss
from .sparse_selection import ScopeEntry, split_positions, top_k

LORA_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class SPTLoRALinear(LoRALinear):
    """LoRA whose unmerge restores W bitwise, like the sparse deltas beside it (W + BA − BA is not
    W in floating point): merge keeps the pre-merge weight while merged (layers.py)."""

    stash_on_merge = True


class SPTLoRAConv(LoRAConv):
    stash_on_merge = True


def lora_cost(module: nn.Module, attr: str, r: int) -> int | None:
    """Parameters of a rank-r LoRA on `module`'s weight, or None when it takes no LoRA."""
    if attr != "weight" or not isinstance(module, LORA_LAYERS):
        return None
    if isinstance(module, nn.Linear):
        return r * (module.in_features + module.out_features)
    weight = module.weight  # (C_out, C_in/g, *k): LoRAConv's A (g·r, C_in/g, *k) + B (C_out, r)
    return r * (module.in_channels * math.prod(weight.shape[2:]) + module.out_channels)


def plan(entries: list[ScopeEntry], chosen: dict[str, torch.Tensor], modules: dict[str, nn.Module],
         r: int, alpha: float, beta: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    """SPT's rule (module docstring): chosen entries per tensor -> (sparse deltas, LoRA modules)."""
    sparse: dict[str, torch.Tensor] = {}
    lora: list[str] = []
    for e in entries:
        idx = chosen[e.name]
        if idx.numel() == 0:
            continue
        cost = lora_cost(modules[e.module], e.attr, r)
        if cost is not None and idx.numel() >= cost / alpha:
            lora.append(e.module)
        elif e.param.dim() == 1 and idx.numel() >= e.param.numel() / beta:
            sparse[e.name] = torch.arange(e.param.numel())  # the whole vector
        else:
            sparse[e.name] = idx
    return sparse, lora


@register_method
@dataclass
class SPT(SparseMethod):
    """Sensitivity-aware PEFT: LoRA where many sensitive weights gather, sparse deltas elsewhere."""

    r: int = 8
    alpha: float = 10.0  # easiness for a matrix to get LoRA: σ(W) ≥ cost(W)/alpha
    beta: float = 5.0  # easiness for a vector to train whole: σ(v) ≥ len(v)/beta
    lora_alpha: float | None = None  # LoRA scaling lora_alpha/r; None: r (scaling 1)
    lora_modules: list[str] | None = None  # a recorded choice: modules that got LoRA

    name: ClassVar[str] = "spt"
    summary: ClassVar[str] = "sensitivity-chosen LoRA (dense matrices) + sparse deltas (the rest)"
    paper: ClassVar[str] = "He et al., ICCV 2023"

    def validate(self) -> None:
        super().validate()
        positive_int(self.name, "r", self.r)
        number_in(self.name, "alpha", self.alpha, 0, math.inf, low_open=True, high_open=True)
        number_in(self.name, "beta", self.beta, 0, math.inf, low_open=True, high_open=True)
        if self.lora_alpha is not None:
            number_in(self.name, "lora_alpha", self.lora_alpha, 0, math.inf, low_open=True, high_open=True)
        if self.lora_modules is not None and not (
                isinstance(self.lora_modules, list) and all(isinstance(m, str) for m in self.lora_modules)):
            raise ConfigError("spt: lora_modules must be a list of module names")

    def choose(self, ctx: ApplyContext, entries: list[ScopeEntry]):
        params = [e.param for e in entries]
        k = self.budget(sum(p.numel() for p in params))
        sensitivity = accumulate_gradients(ctx.model, params, self.data, self.batches,
                                           self.loss_fn or default_loss, square=True,
                                           method=self.name)
        check_gradient(self.name, sensitivity)
        scores = torch.cat([s.reshape(-1) for s in sensitivity])  # (N,)
        del sensitivity
        chosen = split_positions(top_k(scores, k), entries)
        modules = {e.module: get_module(ctx.model, e.module) for e in entries}
        modules = {n: getattr(m, "weighted_layer", m) for n, m in modules.items()}
        return plan(entries, chosen, modules, self.r, self.alpha, self.beta)

    def recorded(self, sparse, lora) -> dict:
        return {**super().recorded(sparse, lora), "lora_modules": sorted(lora)}

    def recorded_lora(self) -> list[str]:
        return list(self.lora_modules or [])

    def wrap_lora(self, ctx: ApplyContext, module: str) -> None:
        alpha = float(self.lora_alpha if self.lora_alpha is not None else self.r)
        try:
            layer = get_module(ctx.model, module)
        except AttributeError as exc:
            raise ConfigError(f"spt: the recorded LoRA module {module} is not in this model") from exc
        layer = getattr(layer, "weighted_layer", layer)
        if not isinstance(layer, LORA_LAYERS):
            raise ConfigError(f"spt: {module} is a {type(layer).__name__}, not a Linear/Conv for LoRA")
        if isinstance(layer, nn.Linear):
            ctx.wrap(self, module, lambda m: SPTLoRALinear(m, self.r, alpha))
        else:
            ctx.wrap(self, module, lambda m: SPTLoRAConv(m, self.r, alpha))
