"""Fitzpatrick17k (Groh et al. 2021) as published (github.com/mattgroh/fitzpatrick17k):

    DOWNLOAD_DIR/fitzpatrick17k.csv   md5hash,fitzpatrick_scale,fitzpatrick_centaur,label,
                                      nine_partition_label,three_partition_label,qc,url,url_alphanum
    DOWNLOAD_DIR/**/<md5hash>.jpg     the images, fetched from the `url` column by the user (any
                                      folder below DOWNLOAD_DIR; the repository's script names
                                      them by md5hash)

16,577 rows. The label is `three_partition_label` (benign, malignant, non-neoplastic) by default;
`label` (114 conditions) or `nine_partition_label` with --label-column. Some source URLs have
gone dead since publication, so rows whose image is absent are left out and counted (the CSV's
`fitzpatrick_scale` is kept for fairness analyses). Split: none is published; the Dutt et al.
grids draw their stratified 75/10/15 split (split seed 0) over the converted rows.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from ..images import DataError
from .labels_csv import write_labels

METADATA = "fitzpatrick17k.csv"
LABEL_COLUMNS = ("three_partition_label", "nine_partition_label", "label")


def rows(src: str | Path, label_column: str = "three_partition_label") -> tuple[list[tuple[Path, str, str]], int]:
    """((image, label, fitzpatrick_scale) for every row with an image, rows without one)."""
    if label_column not in LABEL_COLUMNS:
        raise DataError(f"label column {label_column!r} is not one of {LABEL_COLUMNS}")
    src = Path(src).expanduser()
    meta = src / METADATA
    if not meta.is_file():
        raise DataError(f"{meta} not found: expected the Fitzpatrick17k download ({METADATA} and the "
                        f"images named <md5hash>.jpg) in {src}")
    found = {p.stem: p for p in src.rglob("*.jpg")}
    out, absent, seen = [], 0, set()
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        need = {"md5hash", label_column, "fitzpatrick_scale"} - set(reader.fieldnames or ())
        if need:
            raise DataError(f"{meta} lacks column(s) {sorted(need)}")
        for r in reader:
            if r["md5hash"] in seen:  # one image, one row
                continue
            seen.add(r["md5hash"])
            path = found.get(r["md5hash"])
            if path is None:
                absent += 1
                continue
            out.append((path, r[label_column].strip(), r["fitzpatrick_scale"]))
    if not out:
        raise DataError(f"none of the {absent} images of {meta.name} found under {src} (expected "
                        "<md5hash>.jpg files, e.g. from the repository's download script)")
    return out, absent


def to_csv(src: str | Path, out: str | Path, label_column: str = "three_partition_label") -> Path:
    """Write `out` (path,label,fitzpatrick_scale); paths relative to `out`."""
    items, absent = rows(src, label_column)
    if absent:
        print(f"fitzpatrick17k: {absent} row(s) without an image left out ({len(items)} kept)",
              file=sys.stderr)
    return write_labels(out, ["path", "label", "fitzpatrick_scale"], items)
