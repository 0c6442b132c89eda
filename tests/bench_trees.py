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
                Image.new("L", (size + 4, size), 40 + 20 * p + 5 * s).save(folder / f"{dicom}.jpg")
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
