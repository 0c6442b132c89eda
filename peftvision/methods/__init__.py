"""Built-in methods. Importing a module registers its methods."""

from . import adaptformer, difffit, lora, selective, shpeft, spt, ssf, svdiff, tsa, vpt  # noqa: F401
from .base import Method

__all__ = ["Method"]
