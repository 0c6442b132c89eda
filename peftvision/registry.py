"""Method registry: names (and aliases) -> method config classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

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


@dataclass(frozen=True)
class MethodInfo:
    """What one registered method is and what it supports."""

    name: str
    aliases: tuple[str, ...]
    kind: str  # "selective" or "additive"
    mergeable: bool
    architectures: tuple[str, ...]
    summary: str
    paper: str

    def __str__(self) -> str:
        merge = "merges" if self.mergeable else "no merge"
        return f"{self.name:<10} {self.kind:<10} {merge:<9} {','.join(self.architectures):<24} {self.summary}"


def methods() -> dict[str, MethodInfo]:
    """Every registered method with its kind, merge support, architectures and summary."""
    _ensure_builtin_methods()
    return {name: cls.info() for name, cls in sorted(_REGISTRY.items())}
