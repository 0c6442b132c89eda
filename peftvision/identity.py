"""Who a base model is: class, timm/diffusers name, and a fingerprint of parameter names and shapes
(the shapes they stand for: a bitsandbytes 4-bit weight counts as its float (out, in))."""

from __future__ import annotations

import hashlib
import os

from torch import nn

from .quant import logical_shape
from .state import iter_parameters


def model_name(model: nn.Module) -> str | None:
    """The timm architecture name or diffusers `_name_or_path`, when the model carries one."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, dict) and pretrained_cfg.get("architecture"):
        return pretrained_cfg["architecture"]
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None else None
    return name or None


def hub_origin(model: nn.Module) -> tuple[str | None, str | None]:
    """(Hub repo id, pretrained tag) of the weights the model was built for, when known.

    timm records both in `pretrained_cfg` (e.g. "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "augreg2_in21k_ft_in1k"); a diffusers model loaded from the Hub records its repo id."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, dict) and pretrained_cfg.get("hf_hub_id"):
        return pretrained_cfg["hf_hub_id"], pretrained_cfg.get("tag") or None
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None else None
    if isinstance(name, str) and name.count("/") == 1 and not os.path.exists(name) \
            and not name.startswith((".", "/", "~")):
        return name, None
    return None, None


def fingerprint(model: nn.Module) -> str:
    """sha256 over the user's parameter names and shapes (adapters excluded): equal for two
    instances of the same architecture, different when any layer differs."""
    lines = sorted(f"{e.canonical}:{tuple(logical_shape(e.param))}"  # a quantized base matches its float one
                   for e in iter_parameters(model) if e.adapter is None)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def base_identity(model: nn.Module) -> dict:
    cls = type(model)
    hub_id, tag = hub_origin(model)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "name": model_name(model),
        "hub_id": hub_id,
        "pretrained_tag": tag,
        "fingerprint": fingerprint(model),
    }
