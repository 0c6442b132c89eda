"""The one writer of the benchmark's `csv:` label files that the dataset converters share."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path


def write_labels(out: str | Path, header: list[str], items: Iterable[tuple]) -> Path:
    """Write `out` with `header`, one row per item (image path, label, ...); image paths are
    written relative to `out`'s folder, so the folder can move as a whole."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent.resolve()
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for path, *rest in items:
            w.writerow([os.path.relpath(Path(path).resolve(), base), *rest])
    return out
