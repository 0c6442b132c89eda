"""Adapter checkpoints: adapter_model.safetensors + adapter_config.json (+ README.md card).

Only what was trained is saved: adapter weights, selected base parameters, the head, and the
BatchNorm running statistics (training in train mode changes them, and a reloaded model must give
the same outputs). Writes are atomic per file; the config holds the weights' sha256, so a
weights/config pair from two different saves is detected on load. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import AdapterLoadError, CorruptAdapterError, MergeError, PeftVisionError
from .state import iter_buffers, iter_parameters, require_state

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1


def adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The live tensors an adapter checkpoint holds, by their current state-dict name."""
    state = require_state(model, "save_adapter")
    keep = set(state.selected) | set(state.head)
    tensors: dict[str, Tensor] = {}
    for entry in iter_parameters(model):
        if entry.adapter is not None or entry.canonical in keep:
            tensors[entry.name] = entry.param
    for entry in iter_buffers(model):
        if entry.adapter is not None or isinstance(entry.module, nn.modules.batchnorm._BatchNorm):
            tensors[entry.name] = getattr(entry.module, entry.attr)
    return tensors


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: never a half file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def adapter_config(model: nn.Module) -> dict:
    from . import __version__

    state = require_state(model, "save_adapter")
    return {
        "peftvision_version": __version__,
        "format_version": FORMAT_VERSION,
        "architecture": state.architecture,
        "base_model": state.base_identity,
        "train_head": state.train_head,
        "methods": [{"name": m.name, "config": m.to_dict()} for m in state.methods],
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, card: bool = True,
                 tags: list[str] | None = None, metrics: dict[str, float] | None = None,
                 format: str = "peftvision") -> Path:
    """Save what was trained to `directory` (created if needed); returns the directory.

    Writes adapter_model.safetensors, adapter_config.json and (card=True) a README.md model
    card with `tags` and `metrics`. format="peft" writes a LoRA adapter in Hugging Face peft's
    layout instead (plus diffusers' pytorch_lora_weights.safetensors for a UNet)."""
    from .layers import AdapterLayer

    if any(isinstance(m, AdapterLayer) and m.merged for m in model.modules()):
        # merging rewrote base weights that the adapter may also hold (biases, norms): refuse
        raise MergeError("save_adapter: the adapters are merged into the weights; call "
                         "peftvision.unmerge(model) first (or unload(model, merge=True) and save "
                         "the plain model's state dict)")
    if format == "peft":
        return _save_peft(model, Path(directory))
    if format != "peftvision":
        raise ValueError(f"format must be 'peftvision' or 'peft', got {format!r}")
    from safetensors.torch import save as safetensors_bytes

    from .card import model_card
    from .report import report

    config = adapter_config(model)
    tensors = {}
    seen_storage: set[tuple[int, int]] = set()
    for name, t in adapter_tensors(model).items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        tensors[name] = t.clone() if key in seen_storage else t  # safetensors refuses shared memory
        seen_storage.add(key)
    weights = safetensors_bytes(tensors, metadata={"format": "pt", "library": "peftvision"})
    config["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, weights)
    _atomic_write(out / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    if card:
        _atomic_write(out / CARD_NAME, model_card(config, report(model), tags, metrics).encode())
    return out


def _save_peft(model: nn.Module, out: Path) -> Path:
    from safetensors.torch import save as safetensors_bytes

    from .methods.lora_interop import DIFFUSERS_FILE, diffusers_metadata, peft_files

    config, tensors, diffusers = peft_files(model)
    out.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(out / WEIGHTS_NAME, safetensors_bytes(cpu, metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    if diffusers is not None:
        cpu = {k: v.detach().cpu().contiguous() for k, v in diffusers.items()}
        _atomic_write(out / DIFFUSERS_FILE, safetensors_bytes(cpu, metadata=diffusers_metadata(config)))
    return out


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """Read and verify (config, tensors) from an adapter directory."""
    from safetensors.torch import load as safetensors_load

    from . import __version__

    folder = Path(directory)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterLoadError(f"no {path.name} in {folder}; point load_adapter at a folder "
                                   "written by peftvision.save_adapter")
    try:
        config = json.loads(config_path.read_text())
        if "peft_type" not in config:  # peft's LoRA layout is read through interop below
            _ = config["methods"], config["base_model"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CorruptAdapterError(f"{config_path} is corrupt or not a peftvision config ({exc}); "
                                  "re-save the adapter") from exc
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterLoadError(
            f"{config_path} was written by peftvision {config.get('peftvision_version')} in adapter "
            f"format {config['format_version']}; this peftvision ({__version__}) reads formats up to "
            f"{FORMAT_VERSION}. Upgrade: pip install -U peftvision")
    data = weights_path.read_bytes()
    expected = config.get("weights_sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CorruptAdapterError(
            f"{weights_path} does not match its config (truncated, corrupt, or from another save): "
            "re-save or re-download the adapter")
    try:
        tensors = safetensors_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptAdapterError(f"{weights_path} is truncated or corrupt ({exc}); re-save or "
                                  "re-download the adapter") from exc
    if "peft_type" in config:
        from .methods.lora_interop import from_peft

        return from_peft(config, tensors, folder)
    return config, tensors


def load_adapter(model: nn.Module, source: str | os.PathLike, *, revision: str | None = None,
                 token: str | None = None) -> nn.Module:
    """Re-apply the recorded methods to a fresh base `model` and load the adapter strictly.

    `source` is a folder written by save_adapter or a Hugging Face Hub repo id. On any error
    the model is left as it was."""
    from .api import apply, unload
    from .identity import base_identity
    from .methods.base import Method
    from .registry import get_method

    folder = Path(source)
    if not folder.is_dir():
        from .hub import download_adapter

        folder = download_adapter(str(source), revision=revision, token=token)
    config, tensors = read_adapter(folder)
    if getattr(model, "_peftvision_state", None) is not None:
        raise AdapterLoadError("load_adapter needs a fresh base model, but this one already has "
                               "peftvision methods applied; call peftvision.unload(model) first")
    saved_base = config["base_model"]
    this_base = base_identity(model)
    other_base = saved_base.get("fingerprint") not in (None, this_base["fingerprint"])
    base_note = (f" The adapter was saved for {saved_base.get('name') or saved_base.get('class')} "
                 f"({saved_base.get('class')}); this model is {this_base['name'] or this_base['class']} "
                 f"({this_base['class']}) with different layers." if other_base else "")
    try:
        methods: list[Method] = [get_method(m["name"]).from_dict(m["config"]) for m in config["methods"]]
    except PeftVisionError as exc:
        raise AdapterLoadError(f"{folder / CONFIG_NAME} was written by peftvision "
                               f"{config.get('peftvision_version')} and cannot be used here: {exc}. "
                               "If it names a method this version lacks: pip install -U peftvision") from exc
    try:
        apply(model, methods, train_head=config.get("train_head", True))
    except Exception as exc:
        raise AdapterLoadError(f"cannot re-apply {[m.name for m in methods]} to this model: {exc}."
                               f"{base_note}") from exc
    live = adapter_tensors(model)
    if config.get("from_peft"):  # peft carries no BatchNorm statistics: keep the base model's
        live = {k: v for k, v in live.items() if k in tensors or isinstance(v, nn.Parameter)}
    missing = sorted(set(live) - set(tensors))
    unexpected = sorted(set(tensors) - set(live))
    mismatched = sorted(f"{k}: saved {tuple(tensors[k].shape)}, model {tuple(live[k].shape)}"
                        for k in set(live) & set(tensors) if tensors[k].shape != live[k].shape)
    if missing or unexpected or mismatched:
        unload(model)
        problems = [f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                         ("shape mismatches", mismatched)) if items]
        raise AdapterLoadError(f"adapter in {folder} does not fit this model: {'; '.join(problems)}."
                               f"{base_note or ' Load it onto the base model it was trained from.'}")
    with torch.no_grad():
        for name, target in live.items():
            target.copy_(tensors[name])
    return model
