"""The command line and the presets: option parsing, dry runs, clear failures on missing data."""

import json

import pytest

from benchmarks.cli import main, parse_options
from benchmarks.presets import PRESETS, demo_runs, expand, resolve_datasets, weights_for


def test_parse_options():
    assert parse_options(["r=8", "alpha=16.5", "qkv_parts=qv", "targets=[\"fc1\"]"], ["lora"]) == {
        "r": 8, "alpha": 16.5, "qkv_parts": "qv", "targets": ["fc1"]}
    assert parse_options(["lora.r=4", "vpt.mode=shallow"], ["lora", "vpt"]) == {
        "lora": {"r": 4}, "vpt": {"mode": "shallow"}}
    with pytest.raises(SystemExit, match="METHOD.KEY=VALUE"):
        parse_options(["r=4"], ["lora", "bias"])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_options(["r"], ["lora"])


def test_run_command_with_options_and_a_combination(tmp_path, capsys):
    code = main(["run", "--dataset", "demo:12", "--model", "tiny-vit", "--method", "lora+bias",
                 "--option", "lora.r=2", "--no-pretrained", "--epochs", "1", "--image-size", "32",
                 "--seeds", "0", "1", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    results = sorted(tmp_path.glob("*/result.json"))
    assert [p.parent.name.rsplit("__", 1)[0] for p in results] == ["demo__tiny-vit__lora+bias__f1__s0",
                                                                 "demo__tiny-vit__lora+bias__f1__s1"]
    r = json.loads(results[0].read_text())
    assert r["method"]["names"] == ["lora", "bias"] and r["method"]["options"] == {"lora": {"r": 2}}
    assert "lora+bias" in capsys.readouterr().out
    assert main(["table", str(tmp_path)]) == 0
    assert "lora+bias" in (tmp_path / "tables.md").read_text()
    assert main(["plot", str(tmp_path)]) == 0


def test_run_command_reports_bad_data_clearly(tmp_path, capsys):
    code = main(["run", "--dataset", f"imagefolder:{tmp_path}/nope", "--model", "tiny-resnet",
                 "--method", "bias", "--no-pretrained"])
    assert code == 2 and "dataset directory not found" in capsys.readouterr().err


def test_resume_skips_finished_runs(tmp_path, capsys):
    args = ["run", "--dataset", "demo:12", "--model", "tiny-resnet", "--method", "linear", "--no-pretrained",
            "--epochs", "1", "--image-size", "32", "--out", str(tmp_path), "--quiet", "--resume"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert "exists, skipped" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_dry_run_lists_the_grid(name, tmp_path, capsys):
    assert main([name, "--data-root", str(tmp_path), "--dry-run", "--seeds", "0"]) == 0
    out = capsys.readouterr().out
    preset = PRESETS[name]
    n = len(preset.datasets) * len(preset.models) * len(preset.methods) * len(preset.fractions)
    assert f"{n} runs" in out and "(MISSING)" in out
    assert len([line for line in out.splitlines() if "seed 0" in line]) == n


def test_preset_without_its_data_fails_clearly(tmp_path, capsys):
    assert main(["paper-resnet50", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing datasets (nothing was run)" in err and "busi/{benign,malignant,normal}" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit, match="needs --data-root"):
        main(["paper-vit", "--dry-run"])


def test_preset_dataset_override_and_expand(tmp_path):
    preset = PRESETS["shpeft-clip"]
    datasets = resolve_datasets(preset, None, {"breastus": "imagefolder:/x/busi"}, only=["breastus"])
    assert datasets == {"breastus": "imagefolder:/x/busi"}
    (tmp_path / "vit_base_patch16_clip_224.openai.safetensors").write_bytes(b"")
    runs = expand(preset, datasets, seeds=[0, 1], out="o", weights_dir=str(tmp_path), overrides={"epochs": 3})
    assert len(runs) == 2 * len(preset.methods)
    assert {r.epochs for r in runs} == {3} and runs[0].dataset_name == "breastus"
    assert runs[0].weights.endswith("vit_base_patch16_clip_224.openai.safetensors")
    assert weights_for("resnet50", str(tmp_path)) is None


def test_demo_grid_covers_every_classification_method():
    import peftvision as pv

    runs = demo_runs("o", volume=False)
    labels = {r.method if isinstance(r.method, str) else "+".join(r.method) for r in runs}
    classify = {n for n, i in pv.methods().items() if {"vit", "resnet"} & set(i.architectures)}
    assert classify <= labels and {"bias+norm+attention", "lora+bias"} <= labels
    assert all(r.pretrained is False and r.dataset == "demo" for r in runs)


def test_zero_valued_training_options_are_passed_not_dropped(monkeypatch):
    # regression: `--patience 0` (no early stopping) and `--warmup-epochs 0` were dropped as if
    # unset, because 0 == False, so the runs used patience 5 and one warmup epoch
    import benchmarks.cli as cli

    seen = []
    monkeypatch.setattr(cli, "run_many", lambda configs, resume=False: (seen.extend(configs), ([], []))[1])
    main(["run", "--dataset", "demo", "--model", "tiny-vit", "--method", "lora", "--no-pretrained",
          "--patience", "0", "--warmup-epochs", "0", "--epochs", "3"])
    assert [(c.patience, c.warmup_epochs, c.epochs) for c in seen] == [(0, 0, 3)]
