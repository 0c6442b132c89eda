"""Classifier heads other than timm's plain Linear, for protocols that prescribe one.

    l2norm-linear   SH-PEFT (Liu et al. 2024): features L2-normalised, then a Linear layer
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("linear", "l2norm-linear")


class L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, D), unit length
        return F.normalize(x, dim=-1)


def set_head(model: nn.Module, kind: str) -> nn.Module:
    """Put `kind` in place of the model's classifier (timm get_classifier()); in place."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; known: {', '.join(HEADS)}")
    if kind == "linear":
        return model
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"head {kind!r} needs a timm model whose classifier is a Linear layer, "
                         f"got {type(head).__name__}")
    for name, module in model.named_modules():
        if module is head:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr,
                    nn.Sequential(L2Normalize(), head))
            return model
    raise ValueError("the classifier is not a submodule of the model")  # unreachable for timm
