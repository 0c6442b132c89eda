"""Seeing through the wrappers training code puts around a model.

torch.compile returns an OptimizedModule holding the model as `_orig_mod`; DataParallel and
DistributedDataParallel (also what accelerate's `prepare` returns on several processes) hold it
as `.module`. peftvision always works on, and saves the names of, the user's own model inside.
"""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside any torch.compile / (Distributed)DataParallel wrappers."""
    while True:
        inner = model._modules.get("_orig_mod") if isinstance(model, nn.Module) else None
        if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model
