"""Built-in methods. Importing a module registers its methods."""

from . import (  # noqa: F401
    adapter,
    adaptformer,
    convpass,
    difffit,
    dora,
    fact,
    loha,
    lokr,
    lora,
    oft,
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
