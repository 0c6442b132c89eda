"""load_adapter: re-apply the methods an adapter checkpoint records, then load its tensors.

The tensors an apply would create are checked against the file's on a meta-device copy before
anything is allocated; on any error the model is left as it was. The file itself is read and
checked by checkpoint.read_adapter; a Hub repo id is downloaded by hub.download_adapter.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import CONFIG_NAME, adapter_tensors, read_adapter
from .errors import AdapterLoadError, PeftVisionError
from .wrappers import unwrap


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
                 hotswap: bool = False, text_encoder: nn.Module | None = None,
                 text_encoder_2: nn.Module | None = None) -> nn.Module:
    """Re-apply the recorded methods to the base `model` and load the adapter strictly.

    `source` is a folder written by save_adapter, a Hugging Face Hub repo id, or a single
    .safetensors file in the Stable Diffusion community's layout (kohya-ss / A1111 LoRA and
    LoCon, LyCORIS LoHa and LoKr; see peftvision.interop.kohya). Such a file's text-encoder
    layers load into `text_encoder` (lora_te_ / lora_te1_) and `text_encoder_2` (lora_te2_)
    when given (transformers CLIPTextModel), and are skipped with a warning otherwise. On a
    model that already has adapters, `adapter_name` names the new one, which is loaded beside
    them (inactive until peftvision.set_adapter). hotswap=True instead replaces the weights of
    the existing adapter `adapter_name` in place (same methods and shapes): a torch.compile'd
    model then switches adapters without recompiling. On any error the models are left as they were.

    A folder with several adapters in peft's layout (what peft's save_pretrained writes for a
    PeftModel with several adapters, and save_adapter(adapter_name=[...])): "default" at the
    root, every other adapter in a subfolder named after it. adapter_name=None loads them all
    under their names (the first one active on a model without adapters), adapter_name="x"
    loads only adapter x."""
    from .interop.kohya import is_single_file
    from .multi import adapter_folders, load_several
    from .named import check_adapter_name

    if not isinstance(hotswap, bool):
        raise ValueError(f"hotswap must be True or False, got {hotswap!r}")
    if is_single_file(source):
        from .interop.kohya_load import load_single_file

        return load_single_file(model, Path(source).expanduser(), adapter_name, hotswap,
                                text_encoder, text_encoder_2)
    if text_encoder is not None or text_encoder_2 is not None:
        raise ValueError("text_encoder= and text_encoder_2= go with a single-file (kohya / A1111) "
                         f"adapter; {source!r} is not a file")
    if adapter_name is not None:
        check_adapter_name(adapter_name, None)
    local = Path(source).expanduser()
    several = adapter_folders(local) if local.is_dir() else {}
    if not several:  # name checks before anything is read or downloaded
        _check_name(unwrap(model), adapter_name, hotswap)
    folder = _resolve_source(source, revision, token)
    several = several or adapter_folders(folder)  # a Hub repo in that layout
    if several:  # peft's layout: "default" at the root, the others in subfolders named after them
        load_several(unwrap(model), several, adapter_name, hotswap, _load_folder)
    else:
        _load_folder(unwrap(model), folder, adapter_name, hotswap)
    return model


def _load_folder(model: nn.Module, folder: Path, adapter_name: str | None, hotswap: bool) -> None:
    """load_adapter for the adapter in `folder` itself."""
    config, tensors = read_adapter(folder)
    load_read(model, config, tensors, folder, adapter_name, hotswap)


def _check_name(model: nn.Module, adapter_name: str | None, hotswap: bool) -> None:
    """AdapterLoadError unless `adapter_name` fits what is on `model` (before any download)."""
    from .named import check_adapter_name
    from .state import get_adapters

    found = get_adapters(model)
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
    if adapter_name is not None:
        check_adapter_name(adapter_name, None)


def load_read(model: nn.Module, config: dict, tensors: dict[str, Tensor], folder: Path,
              adapter_name: str | None, hotswap: bool) -> nn.Module:
    """load_adapter once the adapter is read: apply its methods to `model`, then copy the tensors;
    the model is left as it was on any error."""
    from .api import apply
    from .identity import base_identity
    from .methods.base import Method
    from .registry import get_method
    from .state import get_adapters

    wrapper, model = model, unwrap(model)
    _check_name(model, adapter_name, hotswap)
    found = get_adapters(model)
    if hotswap:
        from .hotswap import hotswap_weights

        hotswap_weights(model, adapter_name, config, tensors, folder)
        return wrapper
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
    return wrapper


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
                      stacklevel=5)  # the caller of load_adapter (-> _load_folder -> load_read)
