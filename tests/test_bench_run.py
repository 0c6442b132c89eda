"""End to end: benchmarks.train.run_experiment, the demo, and a run on the real BUSI images."""

import json
import time
from pathlib import Path

import pytest
import torch

from benchmarks.cli import main, run_many
from benchmarks.models import ModelError, build_model
from benchmarks.train import RunConfig, run_experiment

TINY = dict(dataset="demo:12", model="tiny-resnet", pretrained=False, image_size=32, epochs=2,
            batch_size=16, quiet=True)


def test_reduced_demo_end_to_end(tmp_path, capsys):
    start = time.perf_counter()
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--methods", "lora", "bias", "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    results = [json.loads(p.read_text()) for p in out.glob("*/result.json")]
    # lora and bias on both tiny models, plus the data-volume sweep (25%, 50%) on tiny-resnet
    assert len(results) == 8
    assert {r["method"]["label"] for r in results} == {"lora", "bias"}
    for name in ("tables.md", "tables.csv", "summary.csv", "figure1_data_volume.png",
                 "figure1_data_volume.svg", "figure3_parameters.png", "figure3_parameters.svg"):
        assert (out / name).is_file(), name
    assert "NOT pretrained" in printed and "tiny-vit" in printed and str(out) in printed
    assert "NOT pretrained (random init, pretrained=False)" in (out / "tables.md").read_text()
    print(f"reduced demo: {time.perf_counter() - start:.1f} s")


def test_result_json_and_adapter(tmp_path):
    r = run_experiment(RunConfig(**TINY, method="lora", out=str(tmp_path), seed=3))
    (run_dir,) = tmp_path.glob("demo__tiny-resnet__lora__f1__s3__*")  # __<config digest>
    assert r["adapter"]["run"] == run_dir.name == f"demo__tiny-resnet__lora__f1__s3__{r['config_digest']}"
    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk["metrics"]["test"]["macro_f1"] == pytest.approx(r["metrics"]["test"]["macro_f1"])
    assert (run_dir / "adapter_model.safetensors").stat().st_size == r["adapter"]["bytes"] > 0
    assert (run_dir / "adapter_config.json").is_file()
    assert r["config"]["method"] == ["lora"] and r["config"]["seed"] == 3
    assert r["model"]["pretrained"] is False and r["model"]["base_parameters"] > 0
    assert set(r["environment"]["versions"]) >= {"python", "torch", "timm", "peftvision"}
    assert "sha" in r["environment"]["git"] and r["environment"]["hardware"]["cpu_count"] >= 1
    assert r["parameters"]["trainable"] == r["parameters"]["method_params"] + r["parameters"]["by_method"]["head"]
    assert r["peak_memory"]["bytes"] > 0 and r["wall_time_s"] > 0
    assert len(r["history"]) == 2 and r["metrics"]["epochs_run"] == 2


def test_saved_adapter_reloads_onto_a_fresh_model(tmp_path):
    import peftvision as pv
    from benchmarks.data import load_dataset
    from benchmarks.images import ImageDataset

    run_dir = Path(run_experiment(RunConfig(**TINY, method="bias", out=str(tmp_path)))["adapter"]["path"])
    torch.manual_seed(0)
    model = build_model("tiny-resnet", 4, 32, pretrained=False)
    pv.load_adapter(model, run_dir)
    model.eval()
    test = load_dataset("demo:12").splits["test"]
    x = torch.stack([ImageDataset(test, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))[i][0]
                     for i in range(len(test))])
    saved = json.loads((run_dir / "result.json").read_text())
    accuracy = (model(x).argmax(1).numpy() == test.labels).mean()
    assert accuracy == pytest.approx(saved["metrics"]["test"]["accuracy"])


def test_seeded_runs_repeat_exactly():
    a = run_experiment(RunConfig(**TINY, method="lora"))
    b = run_experiment(RunConfig(**TINY, method="lora"))
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    assert a["metrics"]["test"] == b["metrics"]["test"]


def test_on_epoch_sees_every_epoch_and_may_stop_the_run():
    seen = []
    run_experiment(RunConfig(**{**TINY, "epochs": 3}, method="bias"), on_epoch=lambda e, f1: seen.append((e, f1)))
    assert [e for e, _ in seen] == [1, 2, 3] and all(0 <= f1 <= 1 for _, f1 in seen)

    class Pruned(Exception):
        pass

    def prune(epoch, f1):
        raise Pruned(epoch)

    with pytest.raises(Pruned):
        run_experiment(RunConfig(**TINY, method="bias"), on_epoch=prune)


def test_early_stopping_on_a_flat_validation_score():
    # lr 0 on a ViT (no BatchNorm statistics to move): validation F1 never improves after epoch 1
    r = run_experiment(RunConfig(**{**TINY, "model": "tiny-vit", "epochs": 6, "lr": 0.0, "patience": 2},
                                 method="linear"))
    assert r["metrics"]["best_epoch"] == 1 and r["metrics"]["epochs_run"] == 3
    assert r["metrics"]["stopped_early"] is True


def test_data_fraction_is_recorded():
    r = run_experiment(RunConfig(**{**TINY, "dataset": "demo:40", "epochs": 1}, method="linear",
                                 data_fraction=0.25))
    split = r["dataset"]["split"]
    assert split["sizes"]["train"] == 112 and split["train_used"] == 28
    assert split["train_used_per_class"] == [7, 7, 7, 7]


def test_unsupported_and_unregistered_methods_are_skipped_with_a_note():
    configs = [RunConfig(**{**TINY, "model": "tiny-vit"}, method="tsa"),
               RunConfig(**TINY, method="no-such-method")]
    results, notes = run_many(configs, say=lambda m: None)
    assert results == []
    assert "skipped tsa on tiny-vit" in notes[0] and "does not support" in notes[0]
    assert "not registered" in notes[1]


def test_weights_file_and_refusals(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    save_file(build_model("tiny-resnet", 1000, 32, pretrained=False).state_dict(), tmp_path / "w.safetensors")
    r = run_experiment(RunConfig(**{**TINY, "epochs": 1}, method="linear", weights=str(tmp_path / "w.safetensors")))
    assert r["model"]["pretrained"] is True
    assert r["model"]["weights"]["skipped"] == ["fc.bias", "fc.weight"]  # the 1000-class head
    with pytest.raises(ModelError, match="fits only 0 of"):
        run_experiment(RunConfig(**{**TINY, "model": "tiny-vit"}, method="linear",
                                 weights=str(tmp_path / "w.safetensors")))
    with pytest.raises(ModelError, match="not found"):
        run_experiment(RunConfig(**TINY, method="linear", weights=str(tmp_path / "nope.pth")))
    with pytest.raises(ModelError, match="no pretrained weights"):
        run_experiment(RunConfig(**{**TINY, "pretrained": True}, method="linear"))


def test_busi_end_to_end(busi_dir, tmp_path):
    start = time.perf_counter()
    cfg = RunConfig(dataset=f"imagefolder:{busi_dir}", model="tiny-resnet", method="lora", epochs=1,
                    image_size=32, data_fraction=0.2, pretrained=False, out=str(tmp_path), quiet=True)
    r = run_experiment(cfg)
    (path,) = tmp_path.glob("busi__tiny-resnet__lora__f0.2__s0__*/result.json")
    saved = json.loads(path.read_text())
    split = saved["dataset"]["split"]
    assert saved["dataset"]["classes"] == ["benign", "malignant", "normal"]
    assert sum(split["sizes"].values()) == 780 and split["seed"] == 0 and not split["official"]
    assert {c: sum(split["per_class"][s][c] for s in split["sizes"]) for c in saved["dataset"]["classes"]} == {
        "benign": 437, "malignant": 210, "normal": 133}
    assert split["train_used"] == sum(split["train_used_per_class"]) < split["sizes"]["train"] / 4
    assert len(split["indices"]["test"]) == split["sizes"]["test"] and split["files_sha256"]
    test = saved["metrics"]["test"]
    assert 0 <= test["macro_f1"] <= 1 and 0 <= test["accuracy"] <= 1 and 0 <= test["auroc"] <= 1
    assert test["n"] == split["sizes"]["test"]
    assert saved["adapter"]["bytes"] > 0 and saved["parameters"]["by_method"]["lora"] > 0
    assert r["metrics"]["test"]["macro_f1"] == pytest.approx(test["macro_f1"])
    print(f"BUSI run: test macro-F1 {test['macro_f1']:.4f}, accuracy {test['accuracy']:.4f}, "
          f"AUROC {test['auroc']:.4f}, {time.perf_counter() - start:.1f} s")


@pytest.mark.slow
def test_full_demo(tmp_path, capsys):
    start = time.perf_counter()
    assert main(["demo", "--out", str(tmp_path)]) == 0
    elapsed = time.perf_counter() - start
    printed = capsys.readouterr().out
    results = [json.loads(p.read_text()) for p in tmp_path.glob("*/result.json")]
    labels = {r["method"]["label"] for r in results}
    assert {"full", "linear", "lora", "tsa", "vpt", "adaptformer", "bias+norm+attention", "lora+bias"} <= labels
    assert "skipped tsa on tiny-vit" in printed
    with capsys.disabled():
        print(f"\nfull demo: {len(results)} runs in {elapsed:.0f} s")


def test_run_config_rejects_bad_values():
    with pytest.raises(ValueError, match="epochs must be >= 1.*data_fraction must be in"):
        RunConfig(dataset="demo", model="tiny-vit", method="lora", epochs=0, data_fraction=1.5)
