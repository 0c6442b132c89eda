"""Built-in methods. Importing a module registers its methods."""

from . import (  # noqa: F401
    adapter,
    adaptformer,
    convpass,
    difffit,
    fact,
    lora,
    repadapter,
    selective,
    shpeft,
    spt,
    ssf,
    svdiff,
    tsa,
    vpt,
)
from .base import Method

__all__ = ["Method"]
