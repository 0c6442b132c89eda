"""Built-in methods. Importing a module registers its methods."""

from . import lora, selective, ssf  # noqa: F401
from .base import Method

__all__ = ["Method"]
