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


def _dicom(path, pixels, photometric="MONOCHROME2"):
    import numpy as np
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def test_rsna_pneumonia_dicoms_become_pngs_and_a_csv_dataset(tmp_path):
    import numpy as np
    from PIL import Image

    pytest.importorskip("pydicom")
    src = tmp_path / "download"
    (src / "stage_2_train_images").mkdir(parents=True)
    rows = ["patientId,x,y,width,height,Target"]
    for i in range(8):
        pixels = (np.arange(12 * 10).reshape(12, 10) * (i + 1) * 4) % 4096  # 12-bit CT-like range
        _dicom(src / "stage_2_train_images" / f"p{i}.dcm", pixels, "MONOCHROME1" if i == 0 else "MONOCHROME2")
        rows += [f"p{i},1,2,3,4,1", f"p{i},5,6,7,8,1"] if i % 2 else [f"p{i},,,,,0"]  # boxes per positive
    (src / "stage_2_train_labels.csv").write_text("\n".join(rows) + "\n")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    out = tmp_path / "data" / "rsna-pneumonia" / "labels.csv"
    assert main(["rsna-pneumonia", str(src), "--out", str(out)]) == 0
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    data = load_dataset(f"csv:{out}", val_fraction=0.25, test_fraction=0.25)
    assert data.classes == ["0", "1"] and sum(len(s) for s in data.splits.values()) == 8  # one per patient
    png = np.asarray(Image.open(out.parent / "images" / "p1.png"))
    assert png.shape == (12, 10) and png.min() == 0 and png.max() == 255  # own range -> 8 bits
    inverted = np.asarray(Image.open(out.parent / "images" / "p0.png"))
    assert inverted[0, 0] == 255  # MONOCHROME1: 0 is white


def test_rsna_pneumonia_missing_dicom_is_named(tmp_path):
    from benchmarks.datasets.rsna_pneumonia import to_csv

    src = tmp_path / "download"
    (src / "stage_2_train_images").mkdir(parents=True)
    (src / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\npx,,,,,0\n")
    with pytest.raises(DataError, match=r"1 DICOM file.*px\.dcm"):
        to_csv(src, tmp_path / "out" / "labels.csv")


def test_fitzpatrick17k_published_layout_becomes_a_csv_dataset(tmp_path, capsys):
    from tests.bench_trees import write_fitzpatrick17k

    src = write_fitzpatrick17k(tmp_path / "download", per_class=4, absent=1)
    out = tmp_path / "data" / "fitzpatrick17k" / "labels.csv"
    assert main(["fitzpatrick17k", str(src), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 row(s) without an image left out (11 kept)" in captured.err
    data = load_dataset(f"csv:{out}", val_fraction=0.1, test_fraction=0.15)
    assert data.classes == ["benign", "malignant", "non-neoplastic"]
    assert sum(len(s) for s in data.splits.values()) == 11
    assert main(["fitzpatrick17k", str(src), "--out", str(out), "--label-column", "label"]) == 0
    assert load_dataset(f"csv:{out}").classes == ["basal cell carcinoma", "psoriasis", "seborrheic keratosis"]


def test_fitzpatrick17k_without_images_or_csv_is_named(tmp_path):
    from benchmarks.datasets import fitzpatrick17k
    from tests.bench_trees import write_fitzpatrick17k

    with pytest.raises(DataError, match="fitzpatrick17k.csv not found"):
        fitzpatrick17k.to_csv(tmp_path, tmp_path / "x.csv")
    src = write_fitzpatrick17k(tmp_path / "d")
    for p in src.rglob("*.jpg"):
        p.unlink()
    with pytest.raises(DataError, match="none of the 12 images"):
        fitzpatrick17k.to_csv(src, tmp_path / "x.csv")


def test_smdg_published_layout_becomes_a_csv_dataset(tmp_path):
    from tests.bench_trees import write_smdg

    src = write_smdg(tmp_path / "download", per_type=3)
    out = tmp_path / "data" / "smdg" / "labels.csv"
    assert main(["smdg", str(src), "--out", str(out)]) == 0
    data = load_dataset(f"csv:{out}", val_fraction=0.1, test_fraction=0.15)
    assert data.classes == ["glaucoma", "non-glaucoma", "suspect"]
    assert sum(len(s) for s in data.splits.values()) == 9
    assert main(["smdg", str(src), "--out", str(out), "--no-suspects"]) == 0
    assert load_dataset(f"csv:{out}").classes == ["glaucoma", "non-glaucoma"]
    with pytest.raises(SystemExit):  # an option of another dataset is refused, not ignored
        main(["ham10000", str(src), "--out", str(out), "--no-suspects"])


def test_smdg_missing_image_and_bad_type_are_named(tmp_path):
    from benchmarks.datasets import smdg
    from tests.bench_trees import write_smdg

    src = write_smdg(tmp_path / "d")
    next(src.rglob("*.png")).unlink()
    with pytest.raises(DataError, match="1 image.* not found"):
        smdg.to_csv(src, tmp_path / "x.csv")
    meta = src / "metadata - standardized.csv"
    meta.write_text(meta.read_text().replace(",-1,", ",2,", 1))
    with pytest.raises(DataError, match="is not 0, 1 or -1"):
        smdg.to_csv(src, tmp_path / "x.csv")


def test_reproduce_reads_the_converted_layouts_under_data_root(tmp_path):
    from benchmarks.presets import missing_data
    from benchmarks.reproduce.cli import dataset_specs
    from tests.bench_trees import write_smdg

    root = tmp_path / "data"
    specs = dataset_specs(["fitzpatrick17k", "smdg", "mimic-cxr"], str(root), {})
    assert specs == {"fitzpatrick17k": f"csv:{root}/fitzpatrick17k/labels.csv",
                     "smdg": f"csv:{root}/smdg/labels.csv", "mimic-cxr": f"mimic-cxr:{root}/mimic-cxr"}
    assert set(missing_data(specs)) == set(specs)
    main(["smdg", str(write_smdg(tmp_path / "download")), "--out", str(root / "smdg" / "labels.csv")])
    assert set(missing_data(specs)) == {"fitzpatrick17k", "mimic-cxr"}
    assert load_dataset(specs["smdg"]).num_classes == 3
