"""Published dataset layouts converted to the benchmark's csv: format (benchmarks/datasets/)."""

import pytest
from PIL import Image

from benchmarks.data import load_dataset
from benchmarks.datasets.__main__ import main
from benchmarks.datasets.ham10000 import CLASSES
from benchmarks.images import DataError


def _ham(root, per_class=3):
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    for i, dx in enumerate(c for c in CLASSES for _ in range(per_class)):
        part = root / ("HAM10000_images_part_1" if i % 2 else "HAM10000_images_part_2")
        part.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 9), (i * 10 % 255, 80, 160)).save(part / f"ISIC_{i:07d}.jpg")
        lines.append(f"HAM_{i:07d},ISIC_{i:07d},{dx},histo,50.0,male,back")
    (root / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_ham10000_published_layout_becomes_a_csv_dataset(tmp_path, capsys):
    src = _ham(tmp_path / "download")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    out = tmp_path / "data" / "ham10000" / "labels.csv"
    assert main(["ham10000", str(src), "--out", str(out)]) == 0
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # the download is untouched
    data = load_dataset(f"csv:{out}", val_fraction=0.1, test_fraction=0.15)
    assert data.classes == sorted(CLASSES) and sum(len(s) for s in data.splits.values()) == 21
    assert f"ham10000=csv:{out}" in capsys.readouterr().out


def test_ham10000_missing_images_and_metadata_are_named(tmp_path):
    src = _ham(tmp_path / "download")
    next(src.rglob("*.jpg")).unlink()
    with pytest.raises(DataError, match="1 image.*not found"):
        from benchmarks.datasets.ham10000 import to_csv
        to_csv(src, tmp_path / "labels.csv")
    assert main(["ham10000", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.csv")]) == 2
