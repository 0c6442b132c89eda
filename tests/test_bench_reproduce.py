"""`python -m benchmarks reproduce NAME`: every grid against the papers' descriptions (Dutt et al.
MIDL 2024; Liu et al. SH-PEFT MICCAI 2024), the dry-run JSON, narrowing, gradient accumulation,
and reduced end-to-end runs on generated MedMNIST-format data and the real BUSI images."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.cli import main
from benchmarks.data import stratified_split, stratified_subset
from benchmarks.demo_data import write_medmnist
from benchmarks.reproduce import GRIDS

DUTT_DATASETS = {"breastus", "ham10000", "fitzpatrick17k", "smdg", "rsna-pneumonia"}
VITS = {"vit_base_patch16_224.augreg_in21k", "vit_large_patch16_224.augreg_in21k",
        "vit_huge_patch14_224.orig_in21k"}
BUSI = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi"
if not BUSI.is_dir():
    BUSI = Path("/work/shared/data/busi")


def _dry(name, *extra):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["reproduce", name, "--dry-run", "--json", *extra]) == 0
    return json.loads(buf.getvalue())


def _set(runs, key):
    return {tuple(r[key]) if isinstance(r[key], list) else r[key] for r in runs}


@pytest.mark.parametrize("name", list(GRIDS))
def test_every_grid_prints_one_json_object_per_run(name):
    d = _dry(name)
    assert d["count"] == len(d["runs"]) > 0 and d["cost_gpu_hours"] >= 0 and d["choices"]
    for r in d["runs"]:
        for key in ("dataset", "model", "weights", "method", "options", "optimizer", "batch_size",
                    "micro_batch", "gradient_accumulation", "lr", "epochs", "steps", "seed", "fraction",
                    "split", "head"):
            assert key in r, (name, key)
        assert r["lr"] == "hpo" or isinstance(r["lr"], float)
        assert (r["epochs"] is None) != (r["steps"] is None)
        assert r["batch_size"] == r["micro_batch"] * r["gradient_accumulation"]
    for c in d["choices"]:
        assert c["paper"] and c["ours"] and c["why"]


def _dutt_common(runs):
    assert all(r["optimizer"] == "adamw" and r["batch_size"] == 512 and r["lr"] == "hpo" for r in runs)
    assert all(r["split"]["train"] == 0.75 for r in runs)
    # one Optuna study per method × model × dataset (× fraction): every seed of a cell shares it
    assert _set(runs, "seed") == {0, 1, 2}


def test_table2_is_resnet50_on_five_datasets():
    runs = _dry("table2")["runs"]
    _dutt_common(runs)
    assert _set(runs, "dataset") == DUTT_DATASETS
    assert _set(runs, "model") == {"resnet50.tv_in1k"}
    assert _set(runs, "label") == {"full", "linear", "bias", "batchnorm", "bias+batchnorm", "lora", "ssf", "tsa"}
    assert len(runs) == 5 * 8 * 3


def test_table3_vit_b_l_h_with_the_papers_method_settings():
    d = _dry("table3")
    runs = d["runs"]
    _dutt_common(runs)
    assert _set(runs, "dataset") == DUTT_DATASETS and _set(runs, "model") == VITS
    by_label = {r["label"]: r for r in runs}
    assert by_label["lora"]["options"] == {"r": 16, "qkv_parts": "qv"}
    assert by_label["adaptformer"]["options"] == {"bottleneck": 5}
    assert by_label["attention"]["options"] == {"extra_params": ["pos_embed"]}
    assert {"vpt-shallow", "layernorm", "attention", "full", "linear", "bias"} <= set(by_label)
    assert len(runs) == 5 * 3 * 11 * 3
    assert d["output"] == "table3"
    # ViT-H's 512-image batch is accumulated from micro-batches
    assert {r["gradient_accumulation"] for r in runs if "huge" in r["model"]} == {16}


def test_table5_mae_and_clip_vit_b():
    runs = _dry("table5")["runs"]
    assert _set(runs, "model") == {"vit_base_patch16_224.mae", "vit_base_patch16_clip_224.openai"}


def test_figure1_ham10000_vit_b_l_full_bitfit_lora_1_to_100_percent():
    runs = _dry("figure1")["runs"]
    assert _set(runs, "dataset") == {"ham10000"}
    assert _set(runs, "model") == VITS - {"vit_huge_patch14_224.orig_in21k"}
    assert _set(runs, "label") == {"full", "bias", "lora"}
    fractions = _set(runs, "fraction")
    assert max(fractions) == 1.0 and min(fractions) == 0.01
    assert _set(runs, "seed") == {0, 1, 2}


def test_figure3_is_table3s_runs():
    f3, t3 = _dry("figure3"), _dry("table3")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "grid"} for r in rs]  # noqa: E731
    assert strip(f3["runs"]) == strip(t3["runs"]) and f3["output"] == "figure3"


def test_table4_mimic_cxr_unet_three_volumes_four_seeds_fid_1000():
    d = _dry("table4")
    runs = d["runs"]
    assert _set(runs, "dataset") == {"mimic-cxr"} and _set(runs, "task") == {"text-to-image"}
    assert _set(runs, "seed") == {0, 1, 2, 3}
    assert {r["extra"]["train_images"] for r in runs} == {110_000, 55_000, 11_000}
    assert {r["extra"]["fid_images"] for r in runs} == {1000}
    assert {r["label"]: r["options"] for r in runs}["lora"] == {"r": 4}
    assert {r["extra"]["train_pool"] for r in runs} == {110_000}
    assert d["runnable"] is None  # the MIMIC-CXR loader exists: the grid runs


def test_shpeft_grids_sgd_64_cosine_40k_iterations_l2_head():
    t1, f4, ab = _dry("shpeft-table1")["runs"], _dry("shpeft-figure4")["runs"], _dry("shpeft-ablations")["runs"]
    for r in t1 + f4 + ab:
        assert (r["optimizer"], r["batch_size"], r["lr"], r["schedule"], r["steps"], r["head"]) == (
            "sgd", 64, 1e-3, "cosine", 40_000, "l2norm-linear")
    assert {"vpt-shallow", "layernorm", "attention", "shpeft", "full", "linear"} <= _set(t1, "label")
    assert len({r["options"]["fraction"] for r in f4}) >= 4
    options = [r["options"] for r in ab]
    assert {o.get("estimator") for o in options} >= {"l1", "l2"}
    assert {o.get("lam") for o in options} >= {0.0, 1.0, 1e6}  # λ sweep and "I_ta only"


def test_narrowing_by_dataset_model_method_seed():
    runs = _dry("table3", "--datasets", "ham10000", "--models", "vit_base_patch16_224.augreg_in21k",
                "--methods", "lora", "bias", "--seeds", "1")["runs"]
    assert len(runs) == 2 and _set(runs, "seed") == {1} and _set(runs, "label") == {"lora", "bias"}


def test_splits_reproduce_the_papers_training_sizes():
    busi = np.repeat([0, 1, 2], [437, 210, 133])  # benign, malignant, normal: 780 images
    assert len(stratified_split(busi, {"val": 0.10, "test": 0.15}, 0)["train"]) == 584  # paper: 584
    ham = np.repeat(np.arange(7), [327, 514, 1099, 115, 1113, 6705, 142])  # HAM10000's 10,015
    train = stratified_split(ham, {"val": 0.10, "test": 0.15}, 0)["train"]
    assert abs(len(train) - 7511) <= 1  # paper 7,511; per-class rounding gives 7,512
    assert abs(len(stratified_subset(ham[train], 0.01, 0)) - 75) <= 1  # paper: 75 at 1%


def _params(model_name, method, options):
    import timm

    import peftvision as pv

    with torch.device("meta"):  # shapes only: ViT-H costs nothing
        model = timm.create_model(model_name, pretrained=False, num_classes=7)
    pv.apply(model, method, **options)
    r = pv.report(model)
    return r.trainable - r.by_method.get("head", 0)


def test_vit_b_parameter_counts_match_the_paper():
    assert round(_params("vit_base_patch16_224", "lora", {"r": 16, "qkv_parts": "qv"}) / 1e6, 1) == 0.6
    assert round(_params("vit_base_patch16_224", "adaptformer", {"bottleneck": 5}) / 1e6, 1) == 0.1
    # attention tuning as the appendix listing: attn parameters and pos_embed, 28.5M
    assert round(_params("vit_base_patch16_224", "attention", {"extra_params": ["pos_embed"]}) / 1e6, 1) == 28.5


@pytest.mark.slow
def test_vit_l_h_parameter_counts_match_the_paper():
    lora = [_params(m, "lora", {"r": 16, "qkv_parts": "qv"}) for m in ("vit_large_patch16_224", "vit_huge_patch14_224")]
    ada = [_params(m, "adaptformer", {"bottleneck": 5}) for m in ("vit_large_patch16_224", "vit_huge_patch14_224")]
    assert [int(x / 1e5) / 10 for x in lora] == [1.5, 2.6]  # the paper's figures, truncated
    assert [round(x / 1e6, 1) for x in ada] == [0.3, 0.5]


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    from safetensors.torch import load_file

    from benchmarks.train import RunConfig, run_experiment

    data = write_medmnist(tmp_path / "tex.npz", sizes=(32, 8, 8))
    weights = []
    for batch, steps in ((16, 1), (16, 4), (4, 1)):
        out = tmp_path / f"b{batch}a{steps}"
        run_experiment(RunConfig(dataset=f"medmnist:{data}", model="tiny-vit", method="lora",
                                 pretrained=False, image_size=32, epochs=2, batch_size=batch,
                                 accumulation_steps=steps, lr=1e-2, patience=0, quiet=True,
                                 device="cpu", out=str(out)))
        weights.append(load_file(next(out.rglob("adapter_model.safetensors"))))
    full, accumulated, small = weights
    assert full.keys() == accumulated.keys()
    # AdamW divides by sqrt(v): float32 summation-order differences of near-zero gradients move
    # single updates by ~1e-5, hence atol 1e-4 (lr 1e-2); a batch of 4 instead moves them by far more.
    for k in full:
        torch.testing.assert_close(accumulated[k], full[k], rtol=1e-3, atol=1e-4)
    assert max((small[k] - full[k]).abs().max().item() for k in full) > 1e-2


@pytest.mark.slow
def test_reduced_table2_end_to_end_with_hpo(tmp_path, capsys):
    data = write_medmnist(tmp_path / "ham.npz", sizes=(48, 16, 16))
    out = tmp_path / "t2"
    args = ["reproduce", "table2", "--out", str(out), "--datasets", "ham10000",
            "--dataset", f"ham10000=medmnist:{data}", "--model-as", "tiny-resnet", "--no-pretrained",
            "--methods", "linear", "lora", "--seeds", "0", "1", "--epochs", "1", "--image-size", "32",
            "--batch-size", "16", "--hpo-trials", "2", "--quiet"]
    assert main(args) == 0
    results = [json.loads(p.read_text()) for p in out.rglob("result.json")]
    assert Counter(r["method"]["label"] for r in results) == {"linear": 2, "lora": 2}  # two seeds each
    assert {r["config"]["accumulation_steps"] for r in results} == {1}
    assert (out / "tables.md").is_file() and (out / "hpo.db").is_file()
    assert main(args + ["--resume"]) == 0
    assert "exists, skipped" in capsys.readouterr().out



def test_l2norm_head_normalises_features_before_the_linear_layer():
    from benchmarks.heads import set_head
    from tests.models import tiny_vit

    torch.manual_seed(0)
    model = set_head(tiny_vit(), "l2norm-linear").eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_head(model.forward_features(x), pre_logits=True)  # (B, D)
    linear = model.get_classifier()[1]
    expected = linear(features / features.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="unknown head"):
        set_head(tiny_vit(), "cosine")


def test_reduced_shpeft_table1_runs_sgd_for_the_given_iterations(tmp_path):
    data = write_medmnist(tmp_path / "busi.npz", sizes=(48, 16, 16))
    out = tmp_path / "sh"
    assert main(["reproduce", "shpeft-table1", "--out", str(out), "--datasets", "breastus",
                 "--dataset", f"breastus=medmnist:{data}", "--model-as", "tiny-vit", "--no-pretrained",
                 "--methods", "linear", "shpeft", "--seeds", "0", "--steps", "5", "--batch-size", "16",
                 "--image-size", "32", "--quiet"]) == 0
    results = {r["method"]["label"]: r for r in (json.loads(p.read_text()) for p in out.rglob("result.json"))}
    assert set(results) == {"linear", "shpeft"}
    for r in results.values():
        c = r["config"]
        assert (c["optimizer"], c["head"], c["steps"], c["lr"]) == ("sgd", "l2norm-linear", 5, 1e-3)
        assert r["metrics"]["epochs_run"] == 2  # 48 images / 16 = 3 steps an epoch: 3 + 2


def _row(model, dataset, method, f1, trainable=1000):
    return {"dataset": dataset, "dataset_size": {"train": 10, "val": 2, "test": 3}, "model": model,
            "pretrained": True, "method": method, "fraction": 1.0, "seed": 0, "f1": f1,
            "accuracy": f1, "auroc": None, "trainable": trainable, "method_params": trainable,
            "total": 10**6, "wall_time_s": 1.0}


def test_table3_rank_is_one_average_over_every_encoder_and_dataset():
    from benchmarks.reproduce.outputs import combined_ranks, table3_markdown

    rows = [_row("A", "d1", "x", .9), _row("A", "d1", "y", .8), _row("A", "d2", "x", .7),
            _row("A", "d2", "y", .8), _row("B", "d1", "x", .9), _row("B", "d1", "y", .5),
            _row("B", "d2", "x", .9), _row("B", "d2", "y", .1)]
    ranks, pairs = combined_ranks(rows)
    assert ranks == {"x": 1.25, "y": 1.75} and len(pairs) == 4  # per encoder: A 1.5/1.5, B 1/2
    text = table3_markdown(rows)
    assert "| x | 1.25 |" in text and "macro-F1 is our choice".lower() in text.lower()


def test_figure3_marker_size_grows_with_parameters(tmp_path, monkeypatch):
    import matplotlib.axes

    from benchmarks.reproduce.outputs import figure3

    sizes = []
    orig = matplotlib.axes.Axes.scatter

    def spy(self, x, y, s=None, **kw):
        sizes.append((x, s))
        return orig(self, x, y, s=s, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", spy)
    rows = [_row("A", "d1", "small", .7, 10), _row("A", "d1", "big", .8, 10**6)]
    paths = figure3(rows, tmp_path)
    assert all(p.is_file() for p in paths) and paths[0].name == "figure3_sized.png"
    by_params = dict(sizes)
    assert by_params[10**6] > by_params[10]


def test_timm_augment_option_uses_timm_transforms_and_the_default_stays_the_papers(tmp_path):
    from benchmarks.data import load_dataset
    from benchmarks.images import ImageDataset
    from benchmarks.timm_augment import TimmImageDataset
    from benchmarks.train import RunConfig, run_experiment

    data = write_medmnist(tmp_path / "tex.npz", sizes=(16, 8, 8))
    split = load_dataset(f"medmnist:{data}").splits["train"]
    mean, std = (0.5,) * 3, (0.5,) * 3
    torch.manual_seed(0)
    train = TimmImageDataset(split, 32, mean, std, train=True)
    a, b = train[0][0], train[0][0]
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)  # random crops / RandAugment
    x = TimmImageDataset(split, 32, mean, std, train=False)[0][0]
    torch.testing.assert_close(x, ImageDataset(split, 32, mean, std)[0][0], atol=0.05, rtol=0)  # same image
    assert RunConfig(dataset="demo", model="tiny-vit", method="lora").augment == "paper"
    r = run_experiment(RunConfig(dataset=f"medmnist:{data}", model="tiny-vit", method="lora", pretrained=False,
                                 image_size=32, epochs=1, batch_size=8, augment="timm", quiet=True, device="cpu"))
    assert r["config"]["augment"] == "timm"


def _fid_result(directory, method, fraction, seed, fid, n_train):
    from benchmarks.results import KIND, write_result

    write_result({"kind": KIND, "schema": 1, "task": "text-to-image",
                  "config": {"fraction": fraction, "seed": seed}, "method": {"label": method},
                  "model": {"name": "tiny"}, "dataset": {"name": "cxr", "split": {"n_train": n_train}},
                  "metrics": {"fid_offline_features": fid}},
                 directory / f"{method}_{fraction}_{seed}")


def test_table_renders_table4_fid_per_volume_average_fid_and_rank(tmp_path, capsys):
    for seed, noise in ((0, 0.0), (1, 2.0)):
        for fraction, n in ((1.0, 100), (0.1, 10)):
            _fid_result(tmp_path, "lora", fraction, seed, 10 + noise + (5 if fraction < 1 else 0), n)
            _fid_result(tmp_path, "bias", fraction, seed, 12 + noise + (1 if fraction < 1 else 0), n)
    assert main(["table", str(tmp_path)]) == 0  # text-to-image results only: Table 4 alone
    text = (tmp_path / "table4.md").read_text()
    assert "| 100 images (100%) | 10 images (10%) | average FID | average rank |" in text
    # lora: 11 ± 1.41 at 100%, 16 at 10% -> average 13.5, ranks 1 and 2; bias: 13, 14 -> 13.5, 2 and 1
    assert "| lora | 11.00 ± 1.41 | 16.00 ± 1.41 | 13.50 | 1.50 |" in text
    assert "| bias | 13.00 ± 1.41 | 14.00 ± 1.41 | 13.50 | 1.50 |" in text
