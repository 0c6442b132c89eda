"""load_adapter(..., hotswap=True): a file's weights copied into an existing adapter in place.

The adapter's tensors stay the same objects, so optimizers and torch.compile'd graphs keep
working (no recompilation). The file must hold the same methods and options (where the layers sit
is checked by the tensor names) and tensors of the same shapes; everything is checked first."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import adapter_tensors
from .errors import AdapterLoadError, PeftVisionError
from .loading import _mismatches
from .state import require_state


def hotswap_weights(model: nn.Module, adapter_name: str, config: dict, tensors: dict[str, Tensor],
                    folder: Path) -> None:
    """Copy the file's tensors into adapter `adapter_name`'s own, in place: same objects, so
    optimizers and torch.compile'd graphs keep working. Everything is checked first."""
    state = require_state(model, "load_adapter(hotswap=True)", adapter_name)
    ours = _comparable([{"name": m.name, "config": m.to_dict()} for m in state.methods])
    if ours != _comparable(config["methods"]):
        raise AdapterLoadError(
            f"hotswap: the adapter in {folder} was made with other methods or options than adapter "
            f"{adapter_name!r} ({config['methods']} vs {ours}); hotswap replaces weights of the same "
            "methods and shapes only. Load it under a new adapter_name instead")
    live = adapter_tensors(model, adapter_name)
    problems = _mismatches(live, tensors, bool(config.get("from_peft")))
    if problems:
        raise AdapterLoadError(f"hotswap: adapter in {folder} does not fit adapter {adapter_name!r}: "
                               f"{'; '.join(problems)}")
    with torch.no_grad():
        for name, target in live.items():
            if name in tensors:
                target.copy_(tensors[name])


def _comparable(methods: list[dict]) -> list[dict]:
    """Method entries as their configs write them back (a peft file's lacks our defaults), less
    `targets`: where the layers sit is checked by the tensor names, which a preset and the module
    list a peft file holds name alike."""
    from .registry import get_method

    out = []
    for entry in methods:
        try:
            config = get_method(entry["name"]).from_dict(entry["config"]).to_dict()
        except (PeftVisionError, TypeError, KeyError):
            config = dict(entry.get("config", {}))  # unknown here: compared as written
        config.pop("targets", None)
        out.append({"name": entry["name"], "config": json.loads(json.dumps(config))})
    return out
