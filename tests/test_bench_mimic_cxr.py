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


@pytest.mark.slow  # 12 tiny-UNet runs: about a minute on 2 shared cores
def test_reproduce_table4_runs_on_mimic_cxr_and_draws_table4_and_figure2(tmp_path, capsys):
    from PIL import Image

    from benchmarks.cli import main
    from benchmarks.reproduce.figure2 import load_samples, panels

    write_mimic_cxr(tmp_path / "data" / "mimic-cxr")
    out = tmp_path / "t4"
    args = ["reproduce", "table4", "--data-root", str(tmp_path / "data"), "--out", str(out),
            "--model-as", "tiny", "--methods", "bias", "lora", "--seeds", "0", "--steps", "1",
            "--batch-size", "2", "--image-size", "32", "--inference-steps", "1", "--fid-images", "4",
            "--fid-features", "offline", "--quiet"]
    with pytest.warns(UserWarning, match="110,000 images"):  # the tiny tree has 11
        assert main(args) == 0
    results = [json.loads(p.read_text()) for p in out.rglob("result.json")]
    assert sorted((r["method"]["label"], r["config"]["fraction"]) for r in results) == [
        (m, f) for m in ("bias", "lora") for f in (0.1, 0.5, 1.0)]
    assert {r["dataset"]["split"]["n_test"] for r in results} == {4}
    assert {r["method"]["options"].get("r") for r in results if r["method"]["label"] == "lora"} == {4}
    table = (out / "table4.md").read_text()
    assert "| bias |" in table and "| lora |" in table and "average rank" in table
    figures = sorted(out.glob("figure2_mimic-cxr_f*_s0.png"))
    assert [f.name for f in figures] == ["figure2_mimic-cxr_f0.1_s0.png", "figure2_mimic-cxr_f0.5_s0.png",
                                        "figure2_mimic-cxr_f1_s0.png"]
    assert Image.open(figures[0]).size[0] > 200
    # one panel per data volume; both methods, with the same prompts in the same order
    groups = panels(load_samples(out))
    assert len(groups) == 3 and all(set(g) == {"bias", "lora"} for g in groups.values())
    for g in groups.values():
        assert [s["prompt"] for s in g["bias"]["samples"]] == [s["prompt"] for s in g["lora"]["samples"]]
    assert main(args + ["--resume"]) == 0
    assert capsys.readouterr().out.count("exists, skipped") == 6


def _t2i_result(directory, method, seed, prompts, colour):
    from PIL import Image

    from benchmarks.results import KIND, write_result

    run = directory / f"{method}_s{seed}"
    (run / "samples").mkdir(parents=True)
    samples = []
    for i, p in enumerate(prompts):
        for kind, c in (("generated", colour), ("real", 128)):
            Image.new("RGB", (8, 8), (c, c, c)).save(run / f"samples/{kind}_{i:03d}.png")
        samples.append({"index": i, "prompt": p, "generated": f"samples/generated_{i:03d}.png",
                        "real": f"samples/real_{i:03d}.png"})
    write_result({"kind": KIND, "schema": 1, "task": "text-to-image", "config": {"fraction": 1.0, "seed": seed},
                  "method": {"label": method}, "model": {"name": "tiny"},
                  "dataset": {"name": "mimic-cxr", "split": {"n_train": 10, "test_sha256": "t"}},
                  "metrics": {"fid_offline_features": 1.0}, "samples": samples}, run)


def test_figure2_rows_are_methods_and_columns_are_prompts_of_one_seed(tmp_path, monkeypatch):
    import matplotlib.axes

    from benchmarks.reproduce.outputs import write_outputs

    prompts = [f"Impression {i}." for i in range(6)]
    for method, colour in (("lora", 200), ("bias", 50)):
        for seed in (1, 0):
            _t2i_result(tmp_path, method, seed, prompts, colour + seed)
    labels, titles, shown = [], [], []
    orig = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda self, t, **kw: labels.append(t))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, **kw: titles.append(t))
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda self, im, **kw: (shown.append(im.getpixel((0, 0))[0]), orig(self, im, **kw)))
    written = write_outputs("table4", tmp_path)
    assert [p.name for p in written] == ["table4.md", "figure2_mimic-cxr_f1_s0.png"]
    assert labels == ["real (test image)", "bias", "lora"]  # rows: the real image, then methods
    assert titles == prompts[:4]  # columns: the first four prompts
    assert shown == [128] * 4 + [50] * 4 + [200] * 4  # seed 0's images only, row by row


def test_figure2_refuses_runs_with_other_prompts(tmp_path):
    from benchmarks.reproduce.figure2 import write_figure2

    _t2i_result(tmp_path, "lora", 0, ["a", "b"], 10)
    _t2i_result(tmp_path, "bias", 0, ["a", "c"], 20)
    with pytest.raises(ValueError, match="disagree on the prompts"):
        write_figure2(tmp_path)
