"""Built-in methods: every module in this package registers its methods when imported, so adding
a method is adding one file here. Third-party packages register theirs through the
"peftvision.methods" entry-point group (see docs/adding-a-method.md).

The package is also what `peftvision.methods()` calls: one name, one object, so that
`import peftvision.methods` and `pv.methods()` both work whichever is imported first."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import types
import warnings
from typing import TYPE_CHECKING

from .base import Method

if TYPE_CHECKING:
    from ..registry import MethodInfo

__all__ = ["Method"]

ENTRY_POINT_GROUP = "peftvision.methods"


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):  # shared building blocks (base, sparse) register nothing
            importlib.import_module(f"{__name__}.{info.name}")


def load_entry_points() -> None:
    """Import the methods other packages declare under the "peftvision.methods" entry points.

    A plugin that fails to import is reported with a warning, never breaks the built-in methods."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not break peftvision
            warnings.warn(f"peftvision: the method plugin {ep.name!r} ({ep.value}) failed to load: {exc}",
                          stacklevel=2)


_discover()
load_entry_points()


class _MethodsPackage(types.ModuleType):
    """This package, callable: `peftvision.methods()` lists the registered methods."""

    def __call__(self) -> dict[str, MethodInfo]:
        from ..registry import methods

        return methods()


sys.modules[__name__].__class__ = _MethodsPackage
