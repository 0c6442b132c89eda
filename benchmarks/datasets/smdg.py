"""SMDG-19, the Standardized Multi-Channel Dataset for Glaucoma (Kiefer et al.), as published on
Kaggle ("SMDG, A Standardized Fundus Glaucoma Dataset"):

    DOWNLOAD_DIR/metadata - standardized.csv   names,types,fundus,fundus_od_seg,fundus_oc_seg,...
    DOWNLOAD_DIR/full-fundus/full-fundus/<names>.png    (the Kaggle archive nests each folder
                                                         in itself; full-fundus/<names>.png works too)

12,449 fundus images from 19 public datasets. `types` is the label: 0 non-glaucoma, 1 glaucoma,
-1 glaucoma suspect. All three are kept by default (all 12,449 images); --no-suspects drops
the -1 rows for a binary task. Split: none is published; the Dutt et al. grids draw their
stratified 75/10/15 split (split seed 0) over the converted rows.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..images import DataError
from .labels_csv import write_labels

METADATA = "metadata - standardized.csv"
IMAGE_DIRS = ("full-fundus/full-fundus", "full-fundus")
CLASSES = {"0": "non-glaucoma", "1": "glaucoma", "-1": "suspect"}


def _image(src: Path, row: dict) -> Path | None:
    """The full-fundus image of a row: its `fundus` path (/full-fundus/X.png) under either nesting,
    else <names>.png."""
    rel = (row.get("fundus") or "").strip().lstrip("/")
    name = Path(rel).name if rel else f"{row['names']}.png"
    for d in IMAGE_DIRS:
        if (src / d / name).is_file():
            return src / d / name
    return None


def rows(src: str | Path, suspects: bool = True) -> list[tuple[Path, str]]:
    """(image, class name) for every metadata row; DataError naming what is missing."""
    src = Path(src).expanduser()
    meta = src / METADATA
    if not meta.is_file():
        raise DataError(f"{meta} not found: expected the SMDG-19 download ('{METADATA}' and "
                        f"{IMAGE_DIRS[0]}/) in {src}")
    out, missing = [], []
    with open(meta, newline="", encoding="utf-8-sig") as f:
        for r in csv.DictReader(f):
            kind = str(r.get("types", "")).strip().removesuffix(".0")  # pandas may write 1.0
            if kind not in CLASSES:
                raise DataError(f"{meta}: types {r.get('types')!r} of {r.get('names')} is not 0, 1 or -1")
            if kind == "-1" and not suspects:
                continue
            path = _image(src, r)
            (out if path else missing).append((path, CLASSES[kind]) if path else r["names"])
    if missing:
        raise DataError(f"{len(missing)} image(s) of '{METADATA}' not found under {src}, e.g. "
                        f"{missing[0]}.png (looked in {', '.join(IMAGE_DIRS)})")
    return out


def to_csv(src: str | Path, out: str | Path, suspects: bool = True) -> Path:
    """Write `out` (path,label); paths relative to `out`."""
    return write_labels(out, ["path", "label"], rows(src, suspects))
