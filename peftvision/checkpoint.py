"""Adapter checkpoints: adapter_model.safetensors + adapter_config.json (+ README.md card).

Only what was trained is saved: adapter weights, selected base parameters, the head, and the
BatchNorm running statistics (training in train mode changes them, and a reloaded model must give
the same outputs). A folder is replaced as one unit (peftvision.folder); the config also holds the
weights' sha256, so a weights/config pair from two different saves is detected on load. Untrusted
files are checked (JSON shape, tensor shapes and dtypes) before anything is allocated. No pickle.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import AdapterLoadError, CorruptAdapterError, MergeError, PeftVisionError
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


SAVE_FORMATS = ("peftvision", "peft")


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, card: bool = True,
                 tags: list[str] | None = None, metrics: dict[str, float] | None = None,
                 format: str = "peftvision", adapter_name: str | list[str] | None = None) -> Path:
    """Save what was trained to `directory` (created if needed); returns the directory.

    Writes adapter_model.safetensors, adapter_config.json and (card=True) a README.md model
    card with `tags` and `metrics`. adapter_name: the named adapter to save (default: the only,
    or the only active one), saved as if alone on the model. format="peft" writes the adapter in
    Hugging Face peft's layout instead (LoRA with DoRA / rsLoRA, LoHa, LoKr, IA3 or OFT; plus
    diffusers' pytorch_lora_weights.safetensors for a UNet LoRA). A list of adapter names saves
    each of them in peft's multi-adapter layout, in either format: "default" in `directory`,
    every other adapter in `directory/<name>` (load_adapter reads them all back by name).

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


def _resolve_source(source: str | os.PathLike, revision: str | None, token: str | None) -> Path:
    """A local adapter folder, or the Hub repo `source` downloaded to the cache."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    text = os.fspath(source)
    first = Path(text).parts[0] if Path(text).parts else ""
    looks_local = (isinstance(source, os.PathLike) or text.startswith((".", "/", "~"))
                   or os.sep != "/" and os.sep in text or text.count("/") != 1
                   or (first and Path(first).is_dir()))
    if looks_local:
        raise AdapterLoadError(f"adapter folder {text!r} does not exist (and it is not a Hub repo "
                               "id of the form 'user/name'); check the path")
    from .hub import download_adapter

    return download_adapter(text, revision=revision, token=token)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of `model` whose tensors live on the meta device (no memory)."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _check_against_file(model, methods, train_head: bool, tensors: dict[str, Tensor],
                        from_peft: bool, adapter_name: str | None = None) -> list[str]:
    """Problems between the tensors an apply would create and the file's, found on a meta copy
    before anything is allocated (a config claiming r=10**6 must not allocate 150 GB first).
    Returns [] when they fit, or when the meta dry run is not possible for this model."""
    from .api import apply

    try:
        skeleton = apply(_meta_copy(model), methods, train_head=train_head, adapter_name=adapter_name)
    except PeftVisionError:
        raise
    except Exception:  # some layer cannot be built on the meta device: check after the real apply
        return []
    return _mismatches(adapter_tensors(skeleton, adapter_name or "default"), tensors, from_peft)


def _mismatches(live: dict[str, Tensor], tensors: dict[str, Tensor], from_peft: bool) -> list[str]:
    if from_peft:  # peft carries no BatchNorm statistics: keep the base model's
        live = {k: v for k, v in live.items() if k in tensors or isinstance(v, nn.Parameter)}
    missing = sorted(set(live) - set(tensors))
    unexpected = sorted(set(tensors) - set(live))
    common = sorted(set(live) & set(tensors))
    mismatched = [f"{k}: saved {tuple(tensors[k].shape)}, model {tuple(live[k].shape)}"
                  for k in common if tensors[k].shape != live[k].shape]
    wrong_type = [f"{k}: saved {tensors[k].dtype}, model {live[k].dtype}" for k in common
                  if tensors[k].is_floating_point() != live[k].is_floating_point()
                  or (tensors[k].dtype == torch.bool) != (live[k].dtype == torch.bool)]
    return [f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
            for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", mismatched), ("dtype mismatches", wrong_type))
            if items]


def load_adapter(model: nn.Module, source: str | os.PathLike, *, revision: str | None = None,
                 token: str | None = None, adapter_name: str | None = None,
                 hotswap: bool = False) -> nn.Module:
    """Re-apply the recorded methods to the base `model` and load the adapter strictly.

    `source` is a folder written by save_adapter or a Hugging Face Hub repo id. On a model that
    already has adapters, `adapter_name` names the new one, which is loaded beside them (inactive
    until peftvision.set_adapter). hotswap=True instead replaces the weights of the existing
    adapter `adapter_name` in place (same methods and shapes): a torch.compile'd model then
    switches adapters without recompiling. On any error the model is left as it was.

    A folder with several adapters in peft's layout (what peft's save_pretrained writes for a
    PeftModel with several adapters, and save_adapter(adapter_name=[...])): "default" at the
    root, every other adapter in a subfolder named after it. adapter_name=None loads them all
    under their names (the first one active on a model without adapters), adapter_name="x"
    loads only adapter x."""
    from .multi import adapter_folders, load_several
    from .named import check_adapter_name
    from .state import get_adapters

    wrapper, model = model, unwrap(model)
    if not isinstance(hotswap, bool):
        raise ValueError(f"hotswap must be True or False, got {hotswap!r}")
    if adapter_name is not None:
        check_adapter_name(adapter_name, None)
    local = Path(source).expanduser()
    several = adapter_folders(local) if local.is_dir() else {}
    if not several:  # name checks before anything is read or downloaded
        _check_target(get_adapters(model), adapter_name, hotswap)
    folder = _resolve_source(source, revision, token)
    several = several or adapter_folders(folder)  # a Hub repo in that layout
    if several:  # peft's layout: "default" at the root, the others in subfolders named after them
        load_several(model, several, adapter_name, hotswap, _load_folder)
    else:
        _load_folder(model, folder, adapter_name, hotswap)
    return wrapper


def _load_folder(model: nn.Module, folder: Path, adapter_name: str | None, hotswap: bool) -> None:
    """load_adapter for the adapter in `folder` itself (model unwrapped)."""
    from .api import apply
    from .identity import base_identity
    from .methods.base import Method
    from .named import check_adapter_name
    from .registry import get_method
    from .state import get_adapters

    found = get_adapters(model)
    _check_target(found, adapter_name, hotswap)
    if adapter_name is not None:
        check_adapter_name(adapter_name, None)
    config, tensors = read_adapter(folder)
    if hotswap:
        from .hotswap import hotswap_weights

        hotswap_weights(model, adapter_name, config, tensors, folder)
        return
    saved_base = config["base_model"]
    this_base = base_identity(model)
    other_base = saved_base.get("fingerprint") not in (None, this_base["fingerprint"])
    base_note = (f" The adapter was saved for {saved_base.get('name') or saved_base.get('class')} "
                 f"({saved_base.get('class')}); this model is {this_base['name'] or this_base['class']} "
                 f"({this_base['class']}) with different layers." if other_base else "")
    _warn_other_weights(saved_base, this_base)
    try:
        methods: list[Method] = [get_method(m["name"]).from_dict(m["config"]) for m in config["methods"]]
    except (PeftVisionError, TypeError) as exc:
        raise AdapterLoadError(f"{folder / CONFIG_NAME} was written by peftvision "
                               f"{config.get('peftvision_version')} and cannot be used here: {exc}. "
                               "If it names a method this version lacks: pip install -U peftvision") from exc
    train_head = config.get("train_head", True)
    from_peft = bool(config.get("from_peft"))
    if from_peft:  # layers on which peft computes what no peftvision method does
        from .interop.peft import check_peft_targets

        check_peft_targets(model, config)
    try:
        problems = _check_against_file(model, methods, train_head, tensors, from_peft, adapter_name)
    except PeftVisionError as exc:
        raise AdapterLoadError(f"cannot re-apply {[m.name for m in methods]} to this model: {exc}."
                               f"{base_note}") from exc
    if not problems:
        try:
            apply(model, methods, train_head=train_head, adapter_name=adapter_name)
        except Exception as exc:
            raise AdapterLoadError(f"cannot re-apply {[m.name for m in methods]} to this model: {exc}."
                                   f"{base_note}") from exc
        name = adapter_name or "default"
        live = adapter_tensors(model, name)
        problems = _mismatches(live, tensors, from_peft)
        if problems:
            _remove(model, name, found is None)
    if problems:
        raise AdapterLoadError(f"adapter in {folder} does not fit this model: {'; '.join(problems)}."
                               f"{base_note or ' Load it onto the base model it was trained from.'}")
    if from_peft:
        live = {k: v for k, v in live.items() if k in tensors}
    try:
        with torch.no_grad():
            for name, target in live.items():
                target.copy_(tensors[name])
        for module in model.modules():  # e.g. sparse index buffers: range, order, uniqueness
            check = getattr(module, "check_loaded", None)
            if callable(check):
                check()
    except BaseException:
        _remove(model, name, found is None)
        raise


def _check_target(found, adapter_name: str | None, hotswap: bool) -> None:
    """The adapter a load adds or replaces is named when it must be, and exists iff hotswap."""
    if hotswap and (found is None or adapter_name not in found.states):
        raise AdapterLoadError(f"hotswap=True replaces an existing adapter's weights, but this model has "
                               f"no adapter named {adapter_name!r} (adapters: "
                               f"{list(found.states) if found else []}); load it without hotswap first")
    if found is not None and not hotswap:
        if adapter_name is None:
            raise AdapterLoadError("load_adapter: this model already has peftvision methods applied "
                                   f"(adapters {list(found.states)}); load beside them with "
                                   "adapter_name='new name', or call peftvision.unload(model) first")
        if adapter_name in found.states:
            raise AdapterLoadError(f"load_adapter: adapter {adapter_name!r} already exists; pass "
                                   "hotswap=True to replace its weights, or delete_adapter it first")


def _remove(model: nn.Module, adapter_name: str, only: bool) -> None:
    """Take back an adapter load_adapter added (the whole peftvision state when it was the first)."""
    from .api import unload
    from .named import delete_adapter

    if only:
        unload(model)
    else:
        delete_adapter(model, adapter_name)


def _warn_other_weights(saved: dict, this: dict) -> None:
    """Warn when the adapter was trained on other pretrained weights of the same architecture."""
    import warnings

    saved_tag, this_tag = saved.get("pretrained_tag"), this.get("pretrained_tag")
    saved_id, this_id = saved.get("hub_id"), this.get("hub_id")
    if (saved_tag and this_tag and saved_tag != this_tag) or (saved_id and this_id and saved_id != this_id):
        warnings.warn(f"this adapter was trained on {saved_id or saved_tag}, but the base model is "
                      f"{this_id or this_tag}: outputs will differ from the trained model's. Build "
                      f"the base with the recorded weights (e.g. timm.create_model("
                      f"'{saved.get('name')}.{saved_tag}', pretrained=True))",
                      stacklevel=4)
