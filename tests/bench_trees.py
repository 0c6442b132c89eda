"""Tiny generated copies of published dataset layouts (MIMIC-CXR-JPG + reports, Fitzpatrick17k,
SMDG-19), for the loader tests: real file names, columns and nesting, a few images each."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

from PIL import Image

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  Cough.

 FINDINGS:
 The lungs are clear.  No pleural effusion.

 IMPRESSION:
 {impression}
"""
NO_IMPRESSION = " FINAL REPORT\n FINDINGS:\n Heart size is normal.\n"


def write_mimic_cxr(root: Path, train_patients: int = 6, test_patients: int = 3, studies: int = 2,
                    size: int = 24) -> Path:
    """PhysioNet's layout: split/metadata CSVs (gzipped, as published), files/pXX/pID/sSTUDY/*.jpg
    and the reports beside the study folders. Every study has a PA and a LATERAL image; the last
    study of patient 0 has no IMPRESSION section."""
    split_rows, meta_rows = [], []
    for p in range(train_patients + test_patients):
        subject = f"1{p:07d}"
        split = "train" if p < train_patients else "test"
        for s in range(studies):
            study = f"5{p:03d}{s:04d}"
            folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
            folder.mkdir(parents=True, exist_ok=True)
            text = NO_IMPRESSION if (p, s) == (0, studies - 1) else REPORT.format(
                impression=f"Finding {p}-{s}: no acute\n cardiopulmonary process.")
            (folder.parent / f"s{study}.txt").write_text(text)
            for view in ("PA", "LATERAL"):
                dicom = f"{subject}-{study}-{view.lower()}"
                level = 30 + (37 * p + 11 * s) % 160  # a grey ramp per study, inside 0..255
                ramp = bytes(min(255, level + 2 * x) for _ in range(size) for x in range(size + 4))
                Image.frombytes("L", (size + 4, size), ramp).save(folder / f"{dicom}.jpg")
                split_rows.append({"dicom_id": dicom, "study_id": study, "subject_id": subject,
                                   "split": split})
                meta_rows.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                                  "ViewPosition": view, "Rows": size, "Columns": size + 4})
    for name, rows in (("mimic-cxr-2.0.0-split.csv.gz", split_rows),
                       ("mimic-cxr-2.0.0-metadata.csv.gz", meta_rows)):
        with gzip.open(root / name, "wt", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root


FITZ_COLUMNS = ("md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label", "nine_partition_label",
                "three_partition_label", "qc", "url", "url_alphanum")
FITZ_LABELS = (("psoriasis", "inflammatory", "non-neoplastic"),
               ("basal cell carcinoma", "malignant epidermal", "malignant"),
               ("seborrheic keratosis", "benign epidermal", "benign"))


def write_fitzpatrick17k(root: Path, per_class: int = 4, absent: int = 1) -> Path:
    """fitzpatrick17k.csv (its nine columns) and <md5hash>.jpg under root/data/finalfitz17k/; the
    last `absent` rows have no image (a dead source URL)."""
    images = root / "data" / "finalfitz17k"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    n = per_class * len(FITZ_LABELS)
    for i in range(n):
        label, nine, three = FITZ_LABELS[i % len(FITZ_LABELS)]
        md5 = f"{i:032x}"
        if i < n - absent:
            Image.new("RGB", (20, 16), (30 + 15 * i, 90, 120)).save(images / f"{md5}.jpg")
        rows.append({"md5hash": md5, "fitzpatrick_scale": i % 6 + 1, "fitzpatrick_centaur": i % 6 + 1,
                     "label": label, "nine_partition_label": nine, "three_partition_label": three,
                     "qc": "", "url": f"https://example.org/{md5}.jpg", "url_alphanum": f"x{md5}jpg"})
    with open(root / "fitzpatrick17k.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FITZ_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return root


def write_smdg(root: Path, per_type: int = 3) -> Path:
    """'metadata - standardized.csv' and full-fundus/full-fundus/<names>.png as in the Kaggle
    archive (types 0, 1 and -1)."""
    images = root / "full-fundus" / "full-fundus"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, kind in enumerate(k for k in (0, 1, -1) for _ in range(per_type)):
        name = f"{('BEH', 'DRISHTI', 'ORIGA')[i % 3]}-{i}"
        Image.new("RGB", (18, 18), (150, 40 + 20 * i, 20)).save(images / f"{name}.png")
        rows.append({"names": name, "types": kind, "fundus": f"/full-fundus/{name}.png",
                     "fundus_od_seg": "", "fundus_oc_seg": "", "eye": "OD", "gender": "", "age": ""})
    with open(root / "metadata - standardized.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root
