"""The `peftvision` logger (stdlib `logging`): what apply did, at INFO and DEBUG.

Silent by default, like every library logger (a NullHandler); turn it on with
`logging.basicConfig(level=logging.INFO)` or `logging.getLogger("peftvision").setLevel(...)`.
Warnings the user must act on stay `warnings.warn`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .methods.base import Method
    from .state import PeftState

logger = logging.getLogger("peftvision")
logger.addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """A child of the `peftvision` logger, e.g. get_logger(__name__)."""
    return logger if name == "peftvision" else logging.getLogger(
        name if name.startswith("peftvision.") else f"peftvision.{name}")


def log_apply(model: nn.Module, methods: Sequence[Method], state: PeftState) -> None:
    """INFO: one line per method (modules wrapped, parameters selected) and the trainable total;
    DEBUG: each wrapped module and each selected parameter."""
    if not logger.isEnabledFor(logging.INFO):
        return  # walking the model costs time on large UNets
    from .layers import AdapterLayer

    wrapped: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            wrapped.setdefault(getattr(module, "method_name", "?"), []).append(name)
    for method in methods:
        layers = wrapped.get(method.name, [])
        chosen = [p for p, by in state.selected.items() if by == method.name]
        logger.info("apply %s on %s (%s): %d modules wrapped, %d parameters selected",
                    method.name, type(model).__name__, state.architecture, len(layers), len(chosen))
        for name in layers:
            logger.debug("%s wraps %s", method.name, name)
        for name in chosen:
            logger.debug("%s selects %s", method.name, name)
    if state.head:
        logger.debug("head trains: %s", ", ".join(state.head))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}",
                100 * trainable / max(total, 1))
