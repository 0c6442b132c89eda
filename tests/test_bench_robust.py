"""The benchmarks lose no run and report no empty result (issue 11, items 11-15): a last batch of
one through BatchNorm, truncated images, malformed MedMNIST files, Excel CSVs, broken result
files, runs that differ only in method options, HPO workers sharing an output folder."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.cli import main
from benchmarks.data import load_dataset
from benchmarks.images import DataError
from benchmarks.results import load_results, write_result
from benchmarks.train import RunConfig, _loader, run_digest, run_dir_name, run_experiment

TINY = dict(dataset="demo:12", model="tiny-resnet", pretrained=False, image_size=32, epochs=1,
            batch_size=16, quiet=True)


# -- 11: a last training batch of one sample ------------------------------------------------------
def test_last_batch_of_one_through_batchnorm_at_28px():
    """tiny-resnet (a real timm ResNet with BatchNorm) at 28 px ends in a 1x1 map, where a batch
    of one has a single value per channel and BatchNorm refuses to train on it."""
    n = len(load_dataset("demo:12").splits["train"])
    cfg = RunConfig(**{**TINY, "image_size": 28, "batch_size": n - 1}, method="bias")  # n = 1·(n-1) + 1
    r = run_experiment(cfg)
    assert r["metrics"]["test"]["n"] > 0 and r["metrics"]["epochs_run"] == 1


def test_train_loader_drops_only_a_last_batch_of_one():
    cfg = RunConfig(**{**TINY, "batch_size": 4}, method="bias")
    sizes = lambda n, train: [len(x) for x in _loader(torch.zeros(n, 1), cfg, True, 0, train)]  # noqa: E731
    assert sizes(9, True) == [4, 4] and sizes(10, True) == [4, 4, 2] and sizes(1, True) == [1]
    assert sizes(9, False) == [4, 4, 1]  # evaluation sees every sample


# -- 12: truncated images whose header is intact ---------------------------------------------------
def _noise(path: Path, size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_fails_before_training(tmp_path, suffix, capsys):
    root = tmp_path / "d"
    for c in ("a", "b"):
        for i in range(4):
            _noise(root / c / f"{i}{suffix}")
    broken = root / "b" / f"2{suffix}"
    data = broken.read_bytes()
    broken.write_bytes(data[:len(data) // 2])  # the header survives, half the pixels do not
    with Image.open(broken) as im:
        assert im.size == (64, 48)  # what the old, header-only check looked at
    with pytest.raises(DataError, match=rf"1 unreadable image.*b/2\{suffix}.*Re-export or remove"):
        load_dataset(f"imagefolder:{root}")
    assert "checking images" not in capsys.readouterr().err  # no progress bar when not a terminal


# -- 13: malformed MedMNIST files, Excel CSVs ------------------------------------------------------
def _npz(path: Path, **change) -> str:
    arrays = {}
    for s, n in (("train", 6), ("val", 3), ("test", 3)):
        arrays[f"{s}_images"] = np.zeros((n, 8, 8), np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    np.savez(path, **{**arrays, **change})
    return f"medmnist:{path}"


@pytest.mark.parametrize("change, message", [
    (dict(train_labels=np.zeros((7, 1), np.uint8)), r"train_labels has shape \(7, 1\) but train_images has 6"),
    (dict(val_labels=np.zeros((2, 1), np.uint8)), r"val_labels has shape \(2, 1\) but val_images has 3"),
    (dict(test_labels=np.array([[0], [-1], [1]])), r"test_labels has negative labels \(-1"),
    (dict(train_labels=np.linspace(0, 1, 6).reshape(6, 1)), r"train_labels has dtype float64.*astype"),
    (dict(test_images=np.zeros((0, 8, 8), np.uint8), test_labels=np.zeros((0, 1), np.uint8)),
     r"test_images is empty"),
])
def test_malformed_npz_is_a_data_error_naming_the_array(tmp_path, change, message):
    with pytest.raises(DataError, match=message):
        load_dataset(_npz(tmp_path / "bad.npz", **change))


def test_valid_npz_still_loads(tmp_path):
    data = load_dataset(_npz(tmp_path / "ok.npz"))
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [6, 3, 3] and data.num_classes == 2


def test_empty_split_stops_the_run_before_training(tmp_path, monkeypatch):
    """Whatever the loader, a run with an empty split stops before training (no n=0 result)."""
    import benchmarks.train as train

    real = train.load_dataset

    def without_test(*a, **kw):
        data = real(*a, **kw)
        data.splits["test"] = data.splits["test"].subset(np.zeros(0, np.int64))
        return data

    monkeypatch.setattr(train, "load_dataset", without_test)
    with pytest.raises(DataError, match="the test split has no images"):
        run_experiment(RunConfig(**TINY, method="linear", out=str(tmp_path)))
    assert not list(tmp_path.rglob("result.json"))


def test_csv_written_by_excel_with_a_bom_loads(tmp_path):
    for c in ("benign", "malignant"):
        for i in range(4):
            _noise(tmp_path / "img" / f"{c}{i}.png", size=(8, 8))
    lines = ["image,label"] + [f"img/{c}{i}.png,{c}" for c in ("benign", "malignant") for i in range(4)]
    (tmp_path / "list.csv").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8-sig")
    data = load_dataset(f"csv:{tmp_path / 'list.csv'}")
    assert data.classes == ["benign", "malignant"] and sum(len(s) for s in data.splits.values()) == 8


# -- 14: one bad result.json among good ones --------------------------------------------------------
def _results_with_two_bad_ones(root: Path) -> tuple[Path, Path, Path]:
    from test_bench_table import fake_result  # the fields tables and plots read

    for i, (m, f1) in enumerate([("full", 0.8), ("lora", 0.7), ("full", 0.82), ("lora", 0.72)]):
        write_result(fake_result("busi", m, i // 2, f1), root / f"run{i}")
    empty = root / "killed" / "result.json"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    partial = root / "old" / "result.json"
    r = fake_result("busi", "bias", 0, 0.6)
    del r["parameters"]
    write_result(r, partial.parent)
    no_test = root / "empty_test" / "result.json"
    r = fake_result("busi", "bias", 1, 0.0)
    r["metrics"]["test"]["n"] = 0
    write_result(r, no_test.parent)
    return empty, partial, no_test


def test_bad_result_files_are_skipped_with_a_warning_naming_them(tmp_path, capsys):
    bad = _results_with_two_bad_ones(tmp_path)
    assert len(load_results(tmp_path)) == 4
    err = capsys.readouterr().err
    for path, why in zip(bad, ("is empty", "parameters.trainable is missing", "n = 0")):
        assert f"skipped {path}: it " in err and why in err
    assert main(["table", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    assert "bias" not in printed.out and all(str(p) in printed.err for p in bad)
    assert main(["plot", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert all(str(p) in err for p in bad)


def test_resume_runs_again_over_a_broken_result(tmp_path, capsys):
    args = ["run", "--dataset", "demo:12", "--model", "tiny-resnet", "--method", "linear", "--no-pretrained",
            "--epochs", "1", "--image-size", "32", "--out", str(tmp_path), "--quiet", "--resume"]
    assert main(args) == 0
    (path,) = tmp_path.glob("*/result.json")
    path.write_bytes(b"")  # a run killed while its result was being written, by an older version
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr()
    assert f"warning: {path} is empty" in printed.err and "running it again" in printed.err
    assert "exists, skipped" not in printed.out
    assert json.loads(path.read_text())["metrics"]["test"]["n"] > 0
    assert main(args) == 0 and "exists, skipped" in capsys.readouterr().out


# -- 15: every distinct configuration has its own folder ---------------------------------------------
def test_runs_differing_only_in_method_options_keep_both_results(tmp_path, capsys):
    base = ["run", "--dataset", "demo:12", "--model", "tiny-resnet", "--method", "lora", "--no-pretrained",
            "--epochs", "1", "--image-size", "32", "--out", str(tmp_path), "--quiet", "--resume"]
    assert main([*base, "--option", "r=2"]) == 0
    assert main([*base, "--option", "r=4"]) == 0
    assert "exists, skipped" not in capsys.readouterr().out
    results = {json.loads(p.read_text())["method"]["options"]["r"]: p.parent.name
               for p in tmp_path.glob("*/result.json")}
    assert sorted(results) == [2, 4]
    assert all(name.startswith("demo__tiny-resnet__lora__f1__s0__") for name in results.values())
    assert main([*base, "--option", "r=4"]) == 0 and "exists, skipped" in capsys.readouterr().out
    assert main(["table", str(tmp_path)]) == 0  # two columns, not one cell averaging r=2 with r=4
    head = (tmp_path / "tables.md").read_text().splitlines()[2]
    assert "lora[r=2]" in head and "lora[r=4]" in head


def test_tables_keep_option_variants_of_a_method_apart(tmp_path):
    from test_bench_table import fake_result

    from benchmarks.results import rows
    from benchmarks.table import build_tables

    results = [fake_result("busi", "lora", s, f1) for s, f1 in ((0, 0.8), (1, 0.7))]
    results += [fake_result("busi", "bias", 0, 0.6)]
    assert [r["method"] for r in rows(results)] == ["lora", "lora", "bias"]  # one option set: as is
    results[1]["method"]["options"] = {"r": 16, "targets": ["qkv"]}
    assert [r["method"] for r in rows(results)] == ["lora", 'lora[r=16,targets=["qkv"]]', "bias"]
    (table,) = build_tables(rows(results))
    assert table.cells["busi", "lora"].n == 1 and table.cells["busi", "lora"].mean == pytest.approx(80)
    results[0]["model"]["name"] = "vit"  # lora with other options on another model: no clash
    assert [r["method"] for r in rows(results)] == ["lora", "lora", "bias"]


def test_run_digest_covers_the_config_but_not_where_it_runs():
    cfg = RunConfig(**TINY, method="lora", method_options={"r": 2})
    same = [dict(out="/elsewhere", device="cpu", num_workers=2, quiet=False),
            dict(method=["lora"]), dict(dataset_name="demo")]
    other = [dict(method_options={"r": 4}), dict(lr=2e-3), dict(epochs=2), dict(seed=1),
             dict(data_fraction=0.5), dict(image_size=64), dict(pretrained=True), dict(weights="a.pth"),
             dict(dataset="demo:13"), dict(method="bias"), dict(mixed_precision="bf16")]
    kw = {**TINY, "method": "lora", "method_options": {"r": 2}}
    assert all(run_digest(RunConfig(**{**kw, **d})) == run_digest(cfg) for d in same)
    digests = {run_digest(RunConfig(**{**kw, **d})) for d in other}
    assert len(digests) == len(other) and run_digest(cfg) not in digests
    # data and weights by file name: the same run from another machine's folders
    assert (run_digest(RunConfig(**{**kw, "weights": "/a/w.pth", "dataset": "imagefolder:/a/busi"}))
            == run_digest(RunConfig(**{**kw, "weights": "/b/w.pth", "dataset": "imagefolder:/b/busi/"})))
    assert run_dir_name(cfg).startswith("demo__tiny-resnet__lora__f1__s0__")
    assert run_dir_name(RunConfig(**kw, name="mine")) == "mine"


def test_repeats_of_one_configuration_count_once_in_tables(tmp_path):
    from test_bench_table import fake_result

    from benchmarks.results import rows

    for i, seed in enumerate((0, 0, 1)):  # two workers retrained seed 0, one seed 1
        write_result({**fake_result("busi", "lora", seed, 0.7 + i / 100), "config_digest": f"d{seed}"},
                     tmp_path / f"w{i}")
    said: list[str] = []
    out = rows(load_results(tmp_path), warn=said.append)
    assert sorted(r["f1"] for r in out) == [0.71, 0.72]
    assert len(said) == 1 and str(tmp_path / "w0") in said[0] and str(tmp_path / "w1") in said[0]


def test_hpo_workers_never_share_a_retrain_folder(tmp_path):
    from benchmarks.hpo import claim_dir

    claimed, barrier = [], threading.Barrier(8)

    def worker():
        barrier.wait()  # all at once, as workers finishing together
        claimed.append(claim_dir(tmp_path / "out" / "seed0"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claimed)) == 8 and all(p.is_dir() for p in claimed)
    assert sorted(p.name for p in claimed) == sorted(["seed0"] + [f"seed0-{i}" for i in range(2, 9)])


def test_hpo_retrained_twice_into_one_out_keeps_both(tmp_path):
    optuna = pytest.importorskip("optuna")  # noqa: F841
    from test_bench_hpo import Cfg, recording, sqlite

    from benchmarks.hpo import run_hpo

    out = tmp_path / "out"
    outs = []
    for _ in range(2):  # two workers (or one study retrained again) with the same --out
        calls, objective = recording()
        run_hpo(Cfg(out=str(out)), trials=3, storage=sqlite(tmp_path), study_name="w",
                objective_fn=objective, seeds=(0, 1))
        outs.append([c.out for c in calls[3:]])
    assert outs == [[str(out / "seed0"), str(out / "seed1")], [str(out / "seed0-2"), str(out / "seed1-2")]]
