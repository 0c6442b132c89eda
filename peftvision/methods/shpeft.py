"""SH-PEFT (Liu et al., MICCAI 2024): train a small data-chosen set of single weights anywhere.

Importance of a weight w over the batches b of `data` (E_b: the loss of batch b):

    I(w) = I_td(w) + λ · (Σ I_td / Σ I_ta) · I_ta(w)       (sums over every weight in scope)

    estimator "l2":  I_td = Σ_b (∂E_b/∂w)²      I_ta = w²
    estimator "l1":  I_td = |Σ_b ∂E_b/∂w|        I_ta = |w|

The ratio puts the task-agnostic term on the scale of the task-specific one, so λ = 1 weighs them
alike. The top `fraction` (or `count`) of all weights in scope — norms and biases included, one
global ranking — are chosen, ties going to the earlier weight in model order; only those train,
as sparse deltas (methods/sparse_layers.py), and the head trains whole. The chosen indices are saved
in the adapter: load_adapter rebuilds the same model without data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..registry import register_method
from .base import ApplyContext, number_in
from .sparse import SparseMethod
from .sparse_importance import accumulate_gradients, check_gradient, default_loss
from .sparse_selection import ScopeEntry, split_positions, top_k

ESTIMATORS = ("l2", "l1")


def importance(task: list[torch.Tensor], weights: list[torch.Tensor], lam: float,
               estimator: str) -> torch.Tensor:
    """I = I_td + λ·(ΣI_td / ΣI_ta)·I_ta for every weight, flattened in model order.

    task: I_td per tensor (Σ g² for l2, |Σ g| for l1), consumed in place; weights: the tensors."""

    def agnostic(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # I_ta: w² or |w|
        w = w.detach().to(like.dtype)
        return w.square() if estimator == "l2" else w.abs()

    total_td = sum(float(t.sum(dtype=torch.float64)) for t in task)
    total_ta = sum(float(agnostic(w, t).sum(dtype=torch.float64)) for t, w in zip(task, weights))
    scale = lam * total_td / total_ta if total_ta > 0 else 0.0  # λ·ΣI_td/ΣI_ta
    for t, w in zip(task, weights):
        t.add_(agnostic(w, t), alpha=scale)  # (shape of w)
    return torch.cat([t.reshape(-1) for t in task])  # (N,)


@register_method
@dataclass
class SHPEFT(SparseMethod):
    """Sparsity-inspired PEFT: top importance weights over the whole backbone, trained sparse."""

    estimator: str = "l2"
    lam: float = 1.0

    name: ClassVar[str] = "shpeft"
    aliases: ClassVar[tuple[str, ...]] = ("sh-peft",)
    summary: ClassVar[str] = "data-chosen single weights anywhere (top importance), sparse deltas"
    paper: ClassVar[str] = "Liu et al., MICCAI 2024"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.estimator, str) or self.estimator.lower() not in ESTIMATORS:
            raise ConfigError(f"shpeft: estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        number_in(self.name, "lam", self.lam, 0, float("inf"), high_open=True)

    def choose(self, ctx: ApplyContext, entries: list[ScopeEntry]):
        params = [e.param for e in entries]
        k = self.budget(sum(p.numel() for p in params))
        estimator = self.estimator.lower()
        task = accumulate_gradients(ctx.model, params, self.data, self.batches,
                                    self.loss_fn or default_loss, square=estimator == "l2",
                                    method=self.name)
        if estimator == "l1":
            task = [t.abs_() for t in task]
        check_gradient(self.name, task)
        scores = importance(task, params, self.lam, estimator)  # (N,)
        del task
        return split_positions(top_k(scores, k), entries), []
