"""Built-in methods. Importing a module registers its methods."""

from . import adaptformer, lora, selective, ssf, tsa, vpt  # noqa: F401
from .base import Method

__all__ = ["Method"]
