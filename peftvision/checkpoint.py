"""Adapter checkpoints: adapter_model.safetensors + adapter_config.json (+ README.md card).

Only what was trained is saved: adapter weights, selected base parameters, the head, and the
BatchNorm running statistics (training in train mode changes them, and a reloaded model must give
the same outputs). A folder is replaced as one unit (peftvision.folder); the config also holds the
weights' sha256, so a weights/config pair from two different saves is detected on load. Untrusted
files are checked (JSON shape, tensor shapes and dtypes) before anything is allocated. No pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from torch import Tensor, nn

from .errors import AdapterLoadError, CorruptAdapterError, MergeError
from .folder import reading, replace_files
from .state import require_state
from .wrappers import unwrap

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1


def adapter_tensors(model: nn.Module, adapter_name: str | None = None) -> dict[str, Tensor]:
    """The tensors an adapter checkpoint holds (the adapter's own copies), keyed by the names a
    model with only this adapter would have, so it loads beside any other adapters."""
    from .named import solo_entries

    model = unwrap(model)
    state = require_state(model, "save_adapter", adapter_name)
    keep = set(state.selected) | set(state.head)
    tensors: dict[str, Tensor] = {}
    for entry in solo_entries(model, state.adapter_name):
        statistics = isinstance(entry.module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            entry.tensor, nn.Parameter)
        if entry.adapter_owned or entry.canonical in keep or statistics:
            tensors[entry.name] = entry.tensor
    return tensors


def adapter_config(model: nn.Module, adapter_name: str | None = None) -> dict:
    from . import __version__

    state = require_state(model, "save_adapter", adapter_name)
    return {
        "peftvision_version": __version__,
        "format_version": FORMAT_VERSION,
        "architecture": state.architecture,
        "base_model": state.base_identity,
        "train_head": state.train_head,
        "methods": [{"name": m.name, "config": m.to_dict()} for m in state.methods],
    }


SAVE_FORMATS = ("peftvision", "peft", "kohya")


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, card: bool = True,
                 tags: list[str] | None = None, metrics: dict[str, float] | None = None,
                 format: str = "peftvision", adapter_name: str | list[str] | None = None,
                 text_encoder: nn.Module | None = None, text_encoder_2: nn.Module | None = None) -> Path:
    """Save what was trained to `directory` (created if needed); returns the directory.

    Writes adapter_model.safetensors, adapter_config.json and (card=True) a README.md model
    card with `tags` and `metrics`. adapter_name: the named adapter to save (default: the only,
    or the only active one), saved as if alone on the model. format="peft" writes the adapter in
    Hugging Face peft's layout instead (LoRA with DoRA / rsLoRA, LoHa, LoKr, IA3 or OFT; plus
    diffusers' pytorch_lora_weights.safetensors for a UNet LoRA). A list of adapter names saves
    each of them in peft's multi-adapter layout, in either format: "default" in `directory`,
    every other adapter in `directory/<name>` (load_adapter reads them all back by name).
    format="kohya" writes one file, `directory` being its path ending in .safetensors, in the
    kohya-ss / A1111 / LyCORIS layout that diffusers' load_lora_weights and A1111 read (LoRA /
    LoCon, LoHa, LoKr on a UNet; the LoRAs of `text_encoder` / `text_encoder_2` too when given);
    no card is written.

    The folder is replaced as one unit (see `peftvision.folder`): a crash or a concurrent save
    leaves either the complete old adapter or the complete new one, and files of an older save
    that the new one does not write (a card, diffusers' file) are removed with it."""
    from .card import check_card_arguments
    from .layers import AdapterLayer

    model = unwrap(model)
    # every argument is checked before anything is computed or written
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {SAVE_FORMATS}, got {format!r}")
    if not isinstance(card, bool):
        raise ValueError(f"card must be True or False, got {card!r}")
    check_card_arguments(tags, metrics)
    if isinstance(adapter_name, (list, tuple)):
        if format == "kohya":
            raise ValueError("format='kohya' writes one adapter to one file; save each adapter "
                             "to its own .safetensors path (adapter_name='name')")
        from .multi import save_several

        return save_several(model, Path(directory), list(adapter_name),
                            lambda name, out: save_adapter(model, out, card=card, tags=tags, metrics=metrics,
                                                           format=format, adapter_name=name))
    state = require_state(model, "save_adapter", adapter_name)
    if any(isinstance(m, AdapterLayer) and m.merged for m in model.modules()):
        # merging rewrote base weights that the adapter may also hold (biases, norms): refuse
        raise MergeError("save_adapter: the adapters are merged into the weights; call "
                         "peftvision.unmerge(model) first (or unload(model, merge=True) and save "
                         "the plain model's state dict)")
    out = Path(directory)
    if (text_encoder is not None or text_encoder_2 is not None) and format != "kohya":
        raise ValueError("text_encoder= and text_encoder_2= go with format='kohya'")
    if format == "kohya":
        from .interop.kohya_save import save_kohya

        save_kohya(model, out, state.adapter_name, text_encoder, text_encoder_2)
        return out
    if format == "peft":
        with _alone(model, state.adapter_name):
            files = _peft_files(model)
    else:
        files = _peftvision_files(model, state.adapter_name, card, tags, metrics)
    replace_files(out, files, remove=_stale_files(out, files))
    return out


@contextlib.contextmanager
def _alone(model: nn.Module, adapter_name: str):
    """Only `adapter_name` active inside the block (code that reads the live model)."""
    from .named import activate
    from .state import get_adapters

    found = get_adapters(model)
    previous = found.active
    if previous == (adapter_name,):
        yield
        return
    activate(model, (adapter_name,))
    try:
        yield
    finally:
        activate(model, previous)


def _peftvision_files(model: nn.Module, adapter_name: str, card: bool, tags, metrics) -> dict[str, bytes]:
    from safetensors.torch import save as safetensors_bytes

    from .card import model_card
    from .report import report

    config = adapter_config(model, adapter_name)
    tensors = {}
    seen_storage: set[tuple[int, int]] = set()
    for name, t in adapter_tensors(model, adapter_name).items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        tensors[name] = t.clone() if key in seen_storage else t  # safetensors refuses shared memory
        seen_storage.add(key)
    weights = safetensors_bytes(tensors, metadata={"format": "pt", "library": "peftvision"})
    config["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    files = {WEIGHTS_NAME: weights, CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode()}
    if card:
        with _alone(model, adapter_name):  # the card counts this adapter's parameters
            files[CARD_NAME] = model_card(config, report(model), tags, metrics).encode()
    return files


def _peft_files(model: nn.Module) -> dict[str, bytes]:
    from safetensors.torch import save as safetensors_bytes

    from .interop.peft import DIFFUSERS_FILE, diffusers_metadata, peft_files

    config, tensors, diffusers = peft_files(model)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    files = {WEIGHTS_NAME: safetensors_bytes(cpu, metadata={"format": "pt"}),
             CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode()}
    if diffusers is not None:
        cpu = {k: v.detach().cpu().contiguous() for k, v in diffusers.items()}
        files[DIFFUSERS_FILE] = safetensors_bytes(cpu, metadata=diffusers_metadata(config))
    return files


def _stale_files(folder: Path, files: dict[str, bytes]) -> list[str]:
    """Files an older save left that would contradict the new adapter: our own model card (a
    README.md the user wrote is kept) and diffusers' LoRA file."""
    from .card import CARD_MARKER
    from .interop.peft import DIFFUSERS_FILE

    stale = [DIFFUSERS_FILE] if DIFFUSERS_FILE not in files else []
    card = folder / CARD_NAME
    if CARD_NAME not in files and card.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if CARD_MARKER in card.read_text()[:2000]:
                stale.append(CARD_NAME)
    return stale


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """Read and verify (config, tensors) from an adapter directory."""
    from safetensors.torch import load as safetensors_load

    from . import __version__

    folder = Path(directory)
    with reading(folder):
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise AdapterLoadError(f"no {path.name} in {folder}; point load_adapter at a folder "
                                       "written by peftvision.save_adapter")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptAdapterError(f"{config_path} is corrupt or not a peftvision config ({exc}); "
                                      "re-save the adapter") from exc
        data = weights_path.read_bytes()
    if not isinstance(config, dict):
        raise CorruptAdapterError(f"{config_path} holds a JSON {type(config).__name__}, not a "
                                  "peftvision config object; re-save the adapter")
    if "peft_type" not in config:  # peft's layout is checked by interop below
        check_config_shape(config, config_path)
    if isinstance(config.get("format_version"), int) and config["format_version"] > FORMAT_VERSION:
        raise AdapterLoadError(
            f"{config_path} was written by peftvision {config.get('peftvision_version')} in adapter "
            f"format {config['format_version']}; this peftvision ({__version__}) reads formats up to "
            f"{FORMAT_VERSION}. Upgrade: pip install -U peftvision")
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
        from .interop.peft import from_peft

        return from_peft(config, tensors, folder)
    return config, tensors


def check_config_shape(config: dict, path: Path) -> None:
    """CorruptAdapterError unless `config` has the fields and JSON types save_adapter writes."""
    def bad(what: str) -> CorruptAdapterError:
        return CorruptAdapterError(f"{path} is not a valid peftvision config: {what}; re-save the "
                                   "adapter with peftvision.save_adapter")

    methods = config.get("methods")
    if not isinstance(methods, list) or not methods:
        raise bad(f'"methods" must be a non-empty list, got {methods!r}')
    for m in methods:
        if not (isinstance(m, dict) and isinstance(m.get("name"), str)
                and isinstance(m.get("config"), dict)):
            raise bad(f'each entry of "methods" must be {{"name": str, "config": {{...}}}}, got {m!r}')
    base = config.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint", ""), (str, type(None))):
        raise bad(f'"base_model" must be an object with the base model\'s identity, got {base!r}')
    if not isinstance(config.get("train_head", True), bool):
        raise bad(f'"train_head" must be true or false, got {config.get("train_head")!r}')
    if "format_version" in config and (not isinstance(config["format_version"], int)
                                       or isinstance(config["format_version"], bool)):
        raise bad(f'"format_version" must be an integer, got {config["format_version"]!r}')
    if not isinstance(config.get("weights_sha256", ""), (str, type(None))):
        raise bad('"weights_sha256" must be a string')
