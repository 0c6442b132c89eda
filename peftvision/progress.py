"""Progress bars for long work (SVDs, importance passes, dataset checks, FID, HPO trials).

A tqdm bar on an interactive terminal; nothing when stderr is not a terminal (logs, CI, pipes)
or when the user asks for quiet. `PEFTVISION_PROGRESS=0` silences every bar, `=1` shows them
even without a terminal (e.g. notebooks). tqdm ships with huggingface_hub, a core dependency;
it is imported only when a bar is shown.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

ENV = "PEFTVISION_PROGRESS"


def enabled(quiet: bool = False) -> bool:
    """Whether a bar would be shown: not quiet, not turned off, and stderr is a terminal
    (or PEFTVISION_PROGRESS=1 forces it)."""
    if quiet:
        return False
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in ("0", "false", "off", "no"):
        return False
    if setting in ("1", "true", "on", "yes"):
        return True
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def progress(iterable: Iterable[T], desc: str, total: int | None = None, *,
             quiet: bool = False, unit: str = "it") -> Iterator[T]:
    """Iterate `iterable` with a progress bar labelled `desc` (see the module doc for when one is
    shown). `total`: the number of items when `len(iterable)` does not tell."""
    if not enabled(quiet):
        yield from iterable
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm missing: work on without a bar
        yield from iterable
        return
    if total is None:
        total = len(iterable) if hasattr(iterable, "__len__") else None
    bar = tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr,
               dynamic_ncols=True)
    try:
        yield from bar
    finally:  # also when the caller stops early (break) or fails
        bar.close()
