"""Built-in methods. Importing a module registers its methods."""

from . import (  # noqa: F401
    adaptformer,
    difffit,
    dora,
    loha,
    lokr,
    lora,
    oft,
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
