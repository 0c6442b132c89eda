"""Folders holding several adapters, in peft's layout (PeftModel.save_pretrained): the adapter
named "default" at the root, every other adapter in a subfolder named after it. Each adapter
folder is an ordinary one (peftvision's or peft's format), written and read as one unit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from .errors import AdapterLoadError, ConfigError
from .named import DEFAULT

CONFIG = "adapter_config.json"


def adapter_folders(folder: Path) -> dict[str, Path]:
    """name -> folder of every adapter in `folder` when it has peft's multi-adapter layout (a
    subfolder holding an adapter_config.json); {} for a folder with one adapter."""
    subfolders = sorted(p for p in folder.iterdir()
                        if p.is_dir() and not p.name.startswith(".") and (p / CONFIG).is_file())
    if not subfolders:
        return {}
    found = {DEFAULT: folder} if (folder / CONFIG).is_file() else {}
    for sub in subfolders:
        if "." in sub.name:
            raise AdapterLoadError(
                f"{sub} holds an adapter, but {sub.name!r} cannot be an adapter name (names have no "
                f"dots); load it alone: load_adapter(model, {str(sub)!r}, adapter_name='...')")
        found[sub.name] = sub
    return found


def load_several(model: nn.Module, folders: dict[str, Path], adapter_name: str | None, hotswap: bool,
                 load_one: Callable[[nn.Module, Path, str, bool], None]) -> None:
    """Load every adapter of `folders` under its name (or only `adapter_name`); all or nothing."""
    from .api import unload
    from .named import delete_adapter
    from .state import get_adapters

    if adapter_name is not None:
        if adapter_name not in folders:
            raise AdapterLoadError(
                f"the folder holds the adapters {list(folders)} (peft's multi-adapter layout: "
                f"'default' at the root, the others in subfolders); adapter_name={adapter_name!r} "
                "names none of them")
        load_one(model, folders[adapter_name], adapter_name, hotswap)
        return
    if hotswap:
        raise AdapterLoadError(f"hotswap=True replaces one adapter's weights: name the adapter of this "
                               f"folder to swap in with adapter_name=... (it holds {list(folders)})")
    found = get_adapters(model)
    clash = [n for n in folders if found is not None and n in found.states]
    if clash:
        raise AdapterLoadError(f"load_adapter: the model already has adapters named {clash}; delete "
                               "them first, or load the folder's adapters one by one with adapter_name=...")
    fresh = found is None
    loaded: list[str] = []
    try:
        for name, folder in folders.items():
            load_one(model, folder, name, False)
            loaded.append(name)
    except BaseException:
        if fresh and loaded:
            unload(model)
        else:
            for name in reversed(loaded):
                delete_adapter(model, name)
        raise


def save_several(model: nn.Module, directory: Path, names: list[str],
                 save_one: Callable[[str, Path], Path]) -> Path:
    """Save adapters `names`: "default" into `directory`, the others into `directory/<name>`."""
    from .state import get_adapters

    found = get_adapters(model)
    known = list(found.states) if found is not None else []
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"save_adapter: adapter_name must be a name or a list of distinct names, got "
                          f"{names!r}; adapters: {known}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"save_adapter: no adapter named {', '.join(map(repr, unknown))}; adapters: {known}")
    unsafe = [n for n in names if "/" in n or "\\" in n or n.startswith(".")]
    if unsafe:  # a name becomes a folder name
        raise ConfigError(f"save_adapter: adapter names {unsafe} cannot be folder names; rename them")
    for name in sorted(names, key=lambda n: n != DEFAULT):  # the root first
        save_one(name, directory if name == DEFAULT else directory / name)
    return directory
