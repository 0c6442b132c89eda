"""MIMIC-CXR (Johnson et al. 2019) for text-to-image: MIMIC-CXR-JPG images, prompts from the
MIMIC-CXR reports, as PhysioNet publishes them (credentialed access; the user downloads):

    ROOT/mimic-cxr-2.0.0-split.csv[.gz]      dicom_id,study_id,subject_id,split (train/validate/test)
    ROOT/mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id,...,ViewPosition,...
    ROOT/files/p10/p10000032/s50414267/02aa804e-....jpg      (MIMIC-CXR-JPG)
    ROOT/files/p10/p10000032/s50414267.txt                   (mimic-cxr-reports.zip, unzipped
                                                              into ROOT or ROOT/mimic-cxr-reports)

The prompt is the report's IMPRESSION section (Dutt et al.'s Table 4 prompts: report impressions);
studies without one are left out. Only frontal views (ViewPosition PA or AP) are kept: a lateral
image beside the same report would pair one prompt with two different-looking images. The split is
PhysioNet's own, which is by patient (no patient is in two splits): training images come from
`train`, the fixed FID set from `test`, so no patient of the test images is ever trained on. The
training pool is capped at `train_images` (Dutt et al.: 110K) by whole patients in a seeded order,
and `group_prefix` takes the smaller volumes (55K, 11K) as prefixes of that order: nested subsets
that keep a patient's images together.
"""

from __future__ import annotations

import csv
import gzip
import random
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..images import DataError

SPLIT = "mimic-cxr-2.0.0-split.csv"
METADATA = "mimic-cxr-2.0.0-metadata.csv"
REPORT_DIRS = (".", "mimic-cxr-reports")
FRONTAL = ("PA", "AP")
# A section heading: a line starting with capitals (and spaces, / or -) followed by a colon.
HEADING = re.compile(r"^\s*([A-Z][A-Z /&()-]+):", re.MULTILINE)


@dataclass(frozen=True)
class Item:
    dicom_id: str
    subject_id: str
    study_id: str
    path: Path
    prompt: str
    view: str


def _open_csv(root: Path, name: str) -> Iterator[dict]:
    for path in (root / name, root / f"{name}.gz"):
        if path.is_file():
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", newline="") as f:
                yield from csv.DictReader(f)
            return
    raise DataError(f"{root / name}[.gz] not found: expected the MIMIC-CXR-JPG download "
                    f"({SPLIT}, {METADATA} and files/) in {root}")


def section(report: str, name: str = "IMPRESSION") -> str | None:
    """The text of a report section (up to the next heading), whitespace collapsed; None if absent
    or empty."""
    headings = list(HEADING.finditer(report))
    for i, h in enumerate(headings):
        if h.group(1).strip() == name:
            end = headings[i + 1].start() if i + 1 < len(headings) else len(report)
            text = " ".join(report[h.end():end].split())
            return text or None
    return None


def image_path(root: Path, subject_id: str, study_id: str, dicom_id: str) -> Path:
    return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}" / f"{dicom_id}.jpg"


def report_path(root: Path, subject_id: str, study_id: str) -> Path | None:
    for d in REPORT_DIRS:
        p = root / d / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}.txt"
        if p.is_file():
            return p
    return None


def items(root: str | Path, split: str, views: Iterable[str] = FRONTAL) -> tuple[list[Item], dict]:
    """Every image of PhysioNet's `split` (train/validate/test) in `views` whose study's report
    has an impression; and counts of what was left out and why."""
    root = Path(root).expanduser()
    views = tuple(views)
    view_of = {r["dicom_id"]: r.get("ViewPosition", "") for r in _open_csv(root, METADATA)}
    rows = [r for r in _open_csv(root, SPLIT) if r["split"] == split]
    if not rows:
        raise DataError(f"{root / SPLIT}: no rows with split {split!r} (expected train/validate/test)")
    dropped = {"other_view": 0, "no_report": 0, "no_impression": 0}
    prompts: dict[tuple[str, str], str | None] = {}
    out, missing = [], []
    for r in rows:
        view = view_of.get(r["dicom_id"], "")
        if view not in views:
            dropped["other_view"] += 1
            continue
        key = (r["subject_id"], r["study_id"])
        if key not in prompts:
            rp = report_path(root, *key)
            prompts[key] = section(rp.read_text(errors="replace")) if rp else "<missing>"
        prompt = prompts[key]
        if prompt == "<missing>":
            dropped["no_report"] += 1
            continue
        if prompt is None:
            dropped["no_impression"] += 1
            continue
        path = image_path(root, r["subject_id"], r["study_id"], r["dicom_id"])
        (out if path.is_file() else missing).append(Item(r["dicom_id"], r["subject_id"], r["study_id"],
                                                         path, prompt, view))
    if missing:
        raise DataError(f"{len(missing)} image(s) of {SPLIT} not found under {root / 'files'}, e.g. "
                        f"{missing[0].path}: download MIMIC-CXR-JPG's files/ into {root}")
    if not out and dropped["no_report"]:
        raise DataError(f"no report text found for {split!r} studies: unzip mimic-cxr-reports.zip into "
                        f"{root} (files/pXX/pXXXXXXXX/sXXXXXXXX.txt)")
    return out, dropped


def group_prefix(records: list, n: int | None, seed: int, group=lambda r: r.subject_id) -> list:
    """The first `n` records in a seeded order of whole groups (patients): smaller `n` give
    prefixes of larger ones (nested volumes); only the last patient may be cut. None: all."""
    by_group: dict[str, list] = {}
    for r in records:
        by_group.setdefault(group(r), []).append(r)
    order = sorted(by_group)
    random.Random(seed).shuffle(order)
    out = [r for g in order for r in by_group[g]]
    if n is not None and n > len(out):
        warnings.warn(f"asked for {n:,} images, only {len(out):,} are there: using all", stacklevel=2)
    return out if n is None else out[:n]


def load(root: str | Path, *, train_images: int | None = None, test_images: int | None = 1000,
         seed: int = 0, views: Iterable[str] = FRONTAL) -> tuple[list[Item], list[Item], dict]:
    """(train, test, info): train from PhysioNet's train split capped at `train_images` by whole
    patients; test `test_images` images of its test split (one per study, seeded), fixed by
    `seed` alone so every run and method is measured on the same images."""
    train, dropped_train = items(root, "train", views)
    test, dropped_test = items(root, "test", views)
    one_per_study = {}
    for it in sorted(test, key=lambda i: i.dicom_id):  # one image per study: 1,000 distinct prompts
        one_per_study.setdefault(it.study_id, it)
    test = group_prefix(list(one_per_study.values()), test_images, seed)
    train = group_prefix(train, train_images, seed)
    info = {"source": "mimic-cxr", "views": list(views), "prompt": "IMPRESSION section",
            "split": "PhysioNet mimic-cxr-2.0.0-split (by patient): train -> training, test -> FID",
            "dropped": {"train": dropped_train, "test": dropped_test},
            "train_patients": len({i.subject_id for i in train}),
            "test_patients": len({i.subject_id for i in test})}
    return train, test, info
