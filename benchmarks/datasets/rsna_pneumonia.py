"""RSNA Pneumonia Detection Challenge (Kaggle, 2018) as published:

    DOWNLOAD_DIR/stage_2_train_labels.csv    patientId,x,y,width,height,Target (a row per box;
                                             one row with Target 0 for a negative study)
    DOWNLOAD_DIR/stage_2_train_images/<patientId>.dcm

One image per patient, label Target (1 pneumonia, 0 not). DICOM pixels are read with pydicom
(`pip install pydicom`, in the bench extra) and written as 8-bit PNGs under the output's
folder, with a labels.csv beside them: the download is never changed. Dutt et al. use 20,412
images; the stage-2 training set has more, and how they chose theirs could not be confirmed
here, so every labelled image is converted and the grid's 75/10/15 split is drawn over them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..images import DataError, to_uint8

LABELS = "stage_2_train_labels.csv"
IMAGES = "stage_2_train_images"


def labels(src: Path) -> dict[str, int]:
    """patientId -> Target (1 where any of its rows is positive)."""
    path = src / LABELS
    if not path.is_file():
        raise DataError(f"{path} not found: expected the RSNA download ({LABELS} and {IMAGES}/) in {src}")
    out: dict[str, int] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("Target") not in ("0", "1"):
                raise DataError(f"{path}: Target {r.get('Target')!r} of {r.get('patientId')} is not 0 or 1")
            out[r["patientId"]] = max(out.get(r["patientId"], 0), int(r["Target"]))
    return out


def read_dicom(path: Path) -> np.ndarray:
    """(H, W) uint8 of a DICOM file: its own range rescaled; MONOCHROME1 inverted."""
    try:
        import pydicom
    except ImportError as e:
        raise DataError("reading RSNA DICOM files needs pydicom: pip install pydicom "
                        "(or pip install -e '.[bench]')") from e
    ds = pydicom.dcmread(path)
    a = to_uint8(ds.pixel_array)
    return 255 - a if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1" else a


def to_csv(src: str | Path, out: str | Path) -> Path:
    """PNGs under out's folder (images/<patientId>.png) and `out` (path,label rows)."""
    from PIL import Image

    src, out = Path(src).expanduser(), Path(out).expanduser()
    targets = labels(src)
    missing = [p for p in targets if not (src / IMAGES / f"{p}.dcm").is_file()]
    if missing:
        raise DataError(f"{len(missing)} DICOM file(s) of {LABELS} not found, e.g. {src / IMAGES / missing[0]}.dcm")
    images = out.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for pid, target in sorted(targets.items()):
        png = images / f"{pid}.png"
        if not png.is_file():  # a rerun converts only what is new
            Image.fromarray(read_dicom(src / IMAGES / f"{pid}.dcm")).save(png)
        rows.append((f"images/{pid}.png", target))
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return out
