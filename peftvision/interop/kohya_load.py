"""load_adapter for a single kohya / A1111 / LyCORIS file: the UNet and, when given, text encoders.

Everything in the file is parsed, named and converted first (interop/kohya.py); then each model
is loaded through load_adapter's own apply-and-check path. If a later model fails, the earlier
ones get their new adapter taken back, so all models are left as they were.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import AdapterLoadError
from ..wrappers import unwrap


def load_single_file(model: nn.Module, path: Path, adapter_name: str | None, hotswap: bool,
                     text_encoder: nn.Module | None, text_encoder_2: nn.Module | None) -> nn.Module:
    from ..loading import _check_name, _remove, load_read
    from ..state import get_adapters
    from .kohya import read_kohya

    models = {"unet": model, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for what, m in models.items():
        if m is not None and not isinstance(m, nn.Module):
            raise ValueError(f"{what} must be a torch module (e.g. a transformers CLIPTextModel), "
                             f"got {type(m).__name__}")
    if hotswap and (text_encoder is not None or text_encoder_2 is not None):
        raise AdapterLoadError("hotswap=True with text_encoder= is not supported: a failure on the "
                               "text encoder could not undo the UNet's swapped weights. Hotswap the "
                               "UNet alone, or load without hotswap")
    for m in models.values():  # names checked on every model before anything is read or applied
        if m is not None:
            _check_name(unwrap(m), adapter_name, hotswap)
    parts = read_kohya(path, {k: unwrap(m) if m is not None else None for k, m in models.items()})
    done: list[tuple[nn.Module, bool]] = []
    try:
        for part in parts:
            target = unwrap(models[part.target])
            first = get_adapters(target) is None
            load_read(target, part.config, part.tensors, path, adapter_name, hotswap)
            done.append((target, first))
    except BaseException:
        for target, first in done:
            _remove(target, adapter_name or "default", first)
        raise
    return model
