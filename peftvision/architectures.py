"""The architecture registry: how a model family is recognised, and where each method goes on it.

An `Architecture` is a structural description registered by name. `detect_architecture` tries
the registrations, most specific first; a model no registration recognises is "generic" (methods
then need explicit targets or a named target set such as "all-linear"). Code outside the library
registers its own families with `register_architecture(Architecture(...))`.

Recognition checks classes only from packages already imported (a model of a timm class cannot
exist unless timm was imported), so this module never imports timm or diffusers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

GENERIC = "generic"

# A placement is a target spec (see targets.py) or a function of the model that returns one.
Placement = Any


@dataclass(frozen=True)
class Architecture:
    """A registered model family.

    name: the family's name ("vit", "swin", "unet"...), recorded in adapter configs.
    classes: ("module.path", "ClassName") pairs; a model that is an instance of one is this
        family (checked only when that module is already imported).
    recognise: an optional extra structural test of the model (attribute layout).
    placements: method name -> default targets of that method on this family, or a function
        model -> targets. A method absent here needs explicit targets on this family (unless it
        runs anywhere, such as bias tuning).
    traits: what the family has, for methods that need it: "tokens" (a ViT token sequence for
        VPT), "classifier" (a timm head), "norm" (norms with affine parameters), "qkv-thirds"
        (fused qkv projections laid out [q; k; v]), "batchnorm",
        "layernorm", "attention", "diffusers".
    priority: higher is tried first (a subclass family before its base's family).
    refusals: method name -> why the method is not placed on this family (shown in its error).
    """

    name: str
    classes: tuple[tuple[str, str], ...] = ()
    recognise: Callable[[nn.Module], bool] | None = None
    placements: Mapping[str, Placement] = field(default_factory=dict)
    traits: frozenset[str] = frozenset()
    priority: int = 0
    description: str = ""
    refusals: Mapping[str, str] = field(default_factory=dict)  # method name -> why it has no placement

    def matches(self, model: nn.Module) -> bool:
        found = [_loaded_class(m, c) for m, c in self.classes]
        if self.classes and not any(cls is not None and isinstance(model, cls) for cls in found):
            return False
        return self.recognise(model) if self.recognise is not None else bool(self.classes)

    def placement(self, method: str, model: nn.Module) -> Placement | None:
        spec = self.placements.get(method)
        return spec(model) if callable(spec) and not isinstance(spec, type) else spec


def _loaded_class(module_name: str, class_name: str) -> type | None:
    """A class from an optional package, only if that package is already imported."""
    module = sys.modules.get(module_name)
    return getattr(module, class_name, None) if module is not None else None


_ARCHITECTURES: dict[str, Architecture] = {}
_GENERIC = Architecture(GENERIC, description="any other model: explicit or named targets")


def register_architecture(arch: Architecture, *, replace: bool = False) -> Architecture:
    """Register a model family (replace=True to override a registration of the same name)."""
    if not isinstance(arch, Architecture):
        raise TypeError(f"register_architecture takes an Architecture, got {type(arch).__name__}")
    if arch.name == GENERIC or (arch.name in _ARCHITECTURES and not replace):
        raise ValueError(f"architecture {arch.name!r} is already registered; pass replace=True")
    _ensure_builtin()
    _ARCHITECTURES[arch.name] = arch
    return arch


def get_architecture(name: str) -> Architecture:
    _ensure_builtin()
    if name == GENERIC:
        return _GENERIC
    if name not in _ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; registered: {', '.join(sorted(_ARCHITECTURES))}")
    return _ARCHITECTURES[name]


def architectures() -> dict[str, Architecture]:
    """Every registered family (without "generic"), most specific first."""
    _ensure_builtin()
    ordered = sorted(_ARCHITECTURES.values(), key=lambda a: -a.priority)
    return {a.name: a for a in ordered}


def detect_architecture(model: nn.Module) -> str:
    """The name of the first registered family that recognises `model`, else "generic"."""
    for arch in architectures().values():
        if arch.matches(model):
            return arch.name
    return GENERIC


_BUILTIN_LOADED = False


def _ensure_builtin() -> None:
    global _BUILTIN_LOADED
    if not _BUILTIN_LOADED:
        _BUILTIN_LOADED = True
        from . import families  # noqa: F401  (registers the shipped families)
