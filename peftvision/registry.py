"""Method registry: names (and aliases) -> method config classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import UnknownMethodError, did_you_mean

if TYPE_CHECKING:
    from .methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}
_ALIASES: dict[str, str] = {}

M = TypeVar("M", bound="type[Method]")


def register_method(cls: M) -> M:
    """Class decorator: make a method config class available by its `name` and `aliases`."""
    for key in (cls.name, *cls.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"method name {key!r} is registered twice")
    _REGISTRY[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


def _ensure_builtin_methods() -> None:
    from . import methods  # noqa: F401  (importing registers the built-in methods)


def get_method(name: str) -> type[Method]:
    """The method config class registered under `name` (or one of its aliases)."""
    _ensure_builtin_methods()
    key = name.lower().strip() if isinstance(name, str) else name
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown method {name!r}{did_you_mean(key, [*_REGISTRY, *_ALIASES])}; "
            f"available methods: {', '.join(sorted(_REGISTRY))}"
            + (f" (aliases: {', '.join(f'{a}={t}' for a, t in sorted(_ALIASES.items()))})"
               if _ALIASES else "")
        )
    return _REGISTRY[key]


# The models of the papers peftvision reproduces (Dutt et al.): timm name -> short label.
PAPER_MODELS = {"resnet50": "ResNet-50", "vit_base_patch16_224": "ViT-B/16",
                "vit_large_patch16_224": "ViT-L/16", "vit_huge_patch14_224": "ViT-H/14"}


@dataclass(frozen=True)
class ReportedCount:
    """A trainable-parameter count a paper prints for a method on one model, and the peftvision
    options of the paper's setting. Declared on the method class (`Method.reported`)."""

    model: str  # timm name, a key of PAPER_MODELS
    figure: str  # as printed, e.g. "0.6M"
    source: str  # e.g. "Dutt et al., MIDL 2024, Table 6"
    options: tuple[tuple[str, Any], ...] = ()  # (option, value) pairs; tuples stand for lists
    ours: int | None = None  # our count with `options` (filled from peftvision/method_counts.py)

    def options_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}


@dataclass(frozen=True)
class MethodInfo:
    """What one registered method is and what it supports.

    `counts`: (timm model, parameters) for the PAPER_MODELS: what the method adds or selects with
    its default options on that model built with 1,000 classes, the head left out; None where
    the method does not run on the model with its defaults. Empty for a method that chooses its
    weights from data (SH-PEFT, SPT) or one registered after peftvision/method_counts.py was made.
    `reported`: the counts its papers print, beside ours with the papers' options."""

    name: str
    aliases: tuple[str, ...]
    kind: str  # "selective" or "additive"
    mergeable: bool
    architectures: tuple[str, ...]
    summary: str
    paper: str
    counts: tuple[tuple[str, int | None], ...] = ()
    reported: tuple[ReportedCount, ...] = ()

    def count(self, model: str) -> int | None:
        """Parameters on timm model `model` (a PAPER_MODELS key); None: not supported or unknown."""
        return dict(self.counts).get(model)

    def __str__(self) -> str:
        merge = "merges" if self.mergeable else "no merge"
        return f"{self.name:<10} {self.kind:<10} {merge:<9} {','.join(self.architectures):<24} {self.summary}"


def methods() -> dict[str, MethodInfo]:
    """Every registered method with its kind, merge support, architectures and summary."""
    _ensure_builtin_methods()
    return {name: cls.info() for name, cls in sorted(_REGISTRY.items())}
