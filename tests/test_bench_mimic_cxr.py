"""MIMIC-CXR for text-to-image (benchmarks/datasets/mimic_cxr.py) on a generated tree in
PhysioNet's layout: impression prompts, frontal views, the patient split, nested volumes, and a
tiny `generate` run on it."""

import json

import pytest

from benchmarks.datasets import mimic_cxr
from benchmarks.generation import data as gdata
from benchmarks.images import DataError
from tests.bench_trees import write_mimic_cxr


def test_impression_section_is_the_prompt():
    report = "FINDINGS:\n Clear lungs.\n\n IMPRESSION:\n No acute\n  process.\n\n RECOMMENDATION(S): none"
    assert mimic_cxr.section(report) == "No acute process."
    assert mimic_cxr.section("IMPRESSION: Small effusion.") == "Small effusion."
    assert mimic_cxr.section("FINDINGS: Clear.") is None
    assert mimic_cxr.section("IMPRESSION:\n\n") is None


def test_loader_keeps_frontal_views_with_an_impression_and_splits_by_patient(tmp_path):
    root = write_mimic_cxr(tmp_path / "mimic-cxr")
    with pytest.warns(UserWarning, match="asked for 1,000 images, only 6"):
        train, test, info = mimic_cxr.load(root, test_images=1000, seed=0)
    # 6 train patients x 2 studies, PA only, minus the one study without an impression
    assert len(train) == 11 and {i.view for i in train} == {"PA"}
    assert info["dropped"]["train"] == {"other_view": 12, "no_report": 0, "no_impression": 1}
    assert len(test) == 6  # 3 test patients x 2 studies (fewer than 1,000 there: all, warned)
    assert not {i.subject_id for i in train} & {i.subject_id for i in test}
    first = next(i for i in train if i.subject_id == "10000001")
    assert first.prompt.startswith("Finding 1-") and "\n" not in first.prompt
    assert first.path.is_file() and first.path.parts[-4:-1] == ("p10", "p10000001", first.path.parts[-2])


def test_training_volume_is_capped_by_whole_patients_and_volumes_nest(tmp_path):
    root = write_mimic_cxr(tmp_path / "m", train_patients=10, studies=3)
    train, _, _ = mimic_cxr.load(root, train_images=20, test_images=2, seed=0)
    assert len(train) == 20
    by_patient = {}
    for i in train:
        by_patient.setdefault(i.subject_id, []).append(i)
    assert sum(len(v) < 3 for k, v in by_patient.items() if k != "10000000") <= 1  # only the last is cut
    records = [gdata.Record(i.dicom_id, i.path, i.prompt, i.view, i.subject_id) for i in train]
    half, tenth = gdata.subset(records, 0.5, seed=1), gdata.subset(records, 0.1, seed=1)
    assert (len(half), len(tenth)) == (10, 2)
    assert [r.name for r in tenth] == [r.name for r in half[:2]]  # 10% inside 50% for one seed
    assert gdata.subset(records, 0.5, seed=2) != half  # another seed, other patients


def test_fid_test_set_is_fixed_by_the_split_seed(tmp_path):
    root = write_mimic_cxr(tmp_path / "m", test_patients=4)
    a = mimic_cxr.load(root, test_images=5, seed=0)[1]
    b = mimic_cxr.load(root, test_images=5, seed=0)[1]
    assert [i.dicom_id for i in a] == [i.dicom_id for i in b] and len(a) == 5
    assert len({i.study_id for i in a}) == 5  # one image per study: distinct prompts


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DataError, match="mimic-cxr-2.0.0-metadata.csv"):
        mimic_cxr.load(tmp_path)
    root = write_mimic_cxr(tmp_path / "m")
    next(root.rglob("*-pa.jpg")).unlink()
    with pytest.raises(DataError, match="MIMIC-CXR-JPG's files/"):
        mimic_cxr.load(root)
    for t in root.rglob("s*.txt"):
        t.unlink()
    with pytest.raises(DataError, match="mimic-cxr-reports.zip"):
        mimic_cxr.load(root)


def test_generate_on_mimic_cxr_records_the_patient_split(tmp_path):
    from benchmarks.generation.run import main

    root = write_mimic_cxr(tmp_path / "mimic-cxr")
    result = main(["--model", "tiny", "--data", f"mimic-cxr:{root}", "--method", "bias", "--steps", "1",
                   "--image-size", "32", "--batch-size", "2", "--inference-steps", "1",
                   "--fid-features", "offline", "--train-images", "8", "--test-images", "4",
                   "--fraction", "0.5", "--figure-samples", "3", "--out", str(tmp_path / "runs")])
    split = result["dataset"]["split"]
    assert result["dataset"]["name"] == "mimic-cxr"
    assert (split["n_train_pool"], split["n_train"], split["n_test"]) == (8, 4, 4)
    assert split["prompt"] == "IMPRESSION section" and split["test_patients"] >= 2
    assert result["metrics"]["num_generated"] == 4
    run_dir = tmp_path / "runs" / result["adapter"]["run"]
    saved = json.loads((run_dir / "result.json").read_text())
    assert len(saved["samples"]) == 3
    assert all((run_dir / s["generated"]).is_file() and (run_dir / s["real"]).is_file()
               for s in saved["samples"])
    assert saved["samples"][0]["prompt"].startswith("Finding ")
