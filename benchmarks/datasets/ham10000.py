"""HAM10000 (Tschandl et al. 2018) as published on the Harvard Dataverse / ISIC:

    DOWNLOAD_DIR/HAM10000_metadata.csv       lesion_id,image_id,dx,dx_type,age,sex,localization
    DOWNLOAD_DIR/HAM10000_images_part_1/ISIC_0024306.jpg ...
    DOWNLOAD_DIR/HAM10000_images_part_2/ISIC_0029306.jpg ...

10,015 images, 7 diagnoses (dx: akiec, bcc, bkl, df, mel, nv, vasc). Dutt et al.'s 7,511 training
images are 75% of them per image (the grid's 75/10/15 split); note that some lesions have several
images, so a per-image split can put one lesion on both sides, as the paper's count implies.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..images import DataError
from .labels_csv import write_labels

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images", "images")


def rows(src: str | Path) -> list[tuple[Path, str]]:
    """(image path, dx) for every metadata row; DataError naming what is missing."""
    src = Path(src).expanduser()
    meta = src / "HAM10000_metadata.csv"
    if not meta.is_file():
        raise DataError(f"{meta} not found: expected the HAM10000 download (HAM10000_metadata.csv "
                        f"and {', '.join(IMAGE_DIRS[:2])}/) in {src}")
    found = {p.stem: p for d in IMAGE_DIRS if (src / d).is_dir() for p in (src / d).glob("*.jpg")}
    out, missing = [], []
    with open(meta, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("dx") not in CLASSES:
                raise DataError(f"{meta}: dx {r.get('dx')!r} of {r.get('image_id')} is not one of {CLASSES}")
            path = found.get(r["image_id"])
            (out if path else missing).append((path, r["dx"]) if path else r["image_id"])
    if missing:
        raise DataError(f"{len(missing)} image(s) of {meta.name} not found under {src}, e.g. "
                        f"{missing[0]}.jpg (looked in {', '.join(IMAGE_DIRS)})")
    return out


def to_csv(src: str | Path, out: str | Path) -> Path:
    """Write `out` (path,label) for the benchmark's `csv:` datasets; paths relative to `out`."""
    return write_labels(out, ["path", "label"], rows(src))
