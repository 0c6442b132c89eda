"""Gradient statistics over data, the raw material of SH-PEFT's importance and SPT's sensitivity."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..progress import progress


def default_loss(output: Any, targets: Tensor) -> Tensor:
    return F.cross_entropy(output, targets)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _run(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def _length(data: Iterable, batches: int | None) -> int | None:
    """How many batches the pass will take, for the progress bar (None: unknown)."""
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:  # a generator
        return batches
    return n if batches is None else min(n, batches)


def accumulate_gradients(model: nn.Module, params: list[nn.Parameter], data: Iterable,
                         batches: int | None, loss_fn: Callable, *, square: bool,
                         method: str) -> list[Tensor]:
    """Per parameter, Σ_b g_b² (square) or Σ_b g_b, with g_b = ∂loss_b/∂p over `batches`
    batches of `data` (None: all of it).

    Eval mode (no dropout; BatchNorm uses and keeps its running statistics), so the choice is
    deterministic; only `params` require grad meanwhile. Each gradient is folded into a float32
    accumulator as backward produces it and then dropped. The model is left as it was: modes,
    requires_grad flags and .grad attributes are restored, also on error."""
    acc = [torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
           for p in params]

    def fold(i: int) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            g = p.grad.to(acc[i].dtype)
            acc[i].addcmul_(g, g) if square else acc[i].add_(g)
            p.grad = None
        return hook

    everything = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in everything]
    modes = [(m, m.training) for m in model.modules()]
    chosen = {id(p) for p in params}
    handles = []
    device = params[0].device
    seen = 0
    try:
        for p in everything:
            p.grad = None
            p.requires_grad_(id(p) in chosen)
        handles = [p.register_post_accumulate_grad_hook(fold(i)) for i, p in enumerate(params)]
        model.eval()
        with torch.enable_grad():
            for batch in progress(data, f"{method}: importance", total=_length(data, batches),
                                  unit="batch"):
                if batches is not None and seen >= batches:
                    break
                if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                    raise ConfigError(f"{method}: each batch of data must be (inputs, targets), got "
                                      f"{type(batch).__name__}")
                inputs, targets = _to(batch[0], device), _to(batch[1], device)
                loss = loss_fn(_run(model, inputs), targets)
                if not (isinstance(loss, Tensor) and loss.numel() == 1):
                    raise ConfigError(f"{method}: loss_fn must return a scalar tensor, got {loss!r:.80}")
                if not loss.requires_grad:
                    raise ConfigError(f"{method}: the loss does not depend on the model's weights "
                                      "(no gradient flows); check loss_fn and the model's output")
                if not torch.isfinite(loss):
                    raise ConfigError(f"{method}: the loss of batch {seen} is {loss.item()}")
                loss.backward()
                seen += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
        for m, training in modes:
            m.training = training
    if seen == 0:
        raise ConfigError(f"{method}: data yielded no batches; pass a non-empty iterable of "
                          "(inputs, targets)")
    return acc


def check_gradient(method: str, task: list[Tensor]) -> float:
    """Σ of the task-specific importance; raises when no gradient reached the scope."""
    total = sum(float(a.sum(dtype=torch.float64)) for a in task)
    if not math.isfinite(total):
        raise ConfigError(f"{method}: the gradients over data are not finite")
    if total == 0.0:
        raise ConfigError(f"{method}: no gradient reached the tensors in scope (all zero); check "
                          "that the loss depends on them and that data has non-trivial targets")
    return total
