"""benchmarks/generation: caption data, the frozen-VAE/text-encoder training step, sampling, FID
with injected features, and a tiny end-to-end run that writes the classification result format."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

import peftvision as pv
from benchmarks.generation import data as gdata
from benchmarks.generation.components import load_components, tiny_components
from benchmarks.generation.fid import OfflineFeatures, compute_fid, make_fid
from benchmarks.generation.run import add_generation_parser, main
from benchmarks.generation.sample import generate
from benchmarks.generation.train import train

CPU = torch.device("cpu")


@pytest.fixture
def demo_dir(tmp_path):
    return gdata.write_demo(tmp_path / "demo", n=12, size=40)


def _loader(records, size=32, batch=2):
    return torch.utils.data.DataLoader(gdata.CaptionDataset(records, size), batch_size=batch,
                                       shuffle=True, generator=torch.Generator().manual_seed(0))


def test_busi_captions(busi_dir):
    records = gdata.load_records(f"imagefolder-with-captions:{busi_dir}")
    assert len(records) == 780
    assert {r.label for r in records} == {"benign", "malignant", "normal"}
    assert all(r.caption and r.image.is_file() for r in records[:20])
    train_set, test_set = gdata.stratified_split(records, 0.2, seed=0)
    assert not {r.name for r in train_set} & {r.name for r in test_set}
    assert len(train_set) + len(test_set) == 780 and {r.label for r in test_set} == {
        "benign", "malignant", "normal"}
    pixels, caption = gdata.CaptionDataset(test_set, 32)[0]
    assert pixels.shape == (3, 32, 32) and -1 <= pixels.min() < pixels.max() <= 1
    assert "breast" in caption.lower()


def test_generated_caption_folder(demo_dir):
    records = gdata.load_records(f"imagefolder-with-captions:{demo_dir}")
    assert len(records) == 12 and {r.label for r in records} == set(gdata.SHAPES)
    assert records[0].caption == "An image of a red circle."
    assert gdata.load_records(str(demo_dir / "captions.csv")) == records  # a bare csv path works
    pixels, _ = gdata.CaptionDataset(records, 32)[0]
    assert pixels.shape == (3, 32, 32)
    in_memory = gdata.load_records("demo")
    assert [r.caption for r in in_memory[:12]] == [r.caption for r in records]
    train_a, test_a = gdata.stratified_split(in_memory, 0.25, seed=0)
    train_b, test_b = gdata.stratified_split(list(reversed(in_memory)), 0.25, seed=0)
    assert [r.name for r in test_a] == [r.name for r in test_b]  # order-independent, seeded


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method", ["lora", ["bias", "norm", "attention"], "difffit"],
                         ids=["lora", "bias+norm+attention", "difffit"])
def test_training_step_changes_only_trainable_unet_params(method):
    c = tiny_components(32)
    pv.apply(c.unet, method)
    trainable = {n for n, p in c.unet.named_parameters() if p.requires_grad}
    before = {name: _state(getattr(c, name)) for name in ("unet", "vae", "text_encoder")}
    losses = train(c, _loader(gdata.demo_records(4, 32)), steps=1, lr=1e-2, device=CPU,
                   generator=torch.Generator().manual_seed(0))
    assert len(losses) == 1 and math.isfinite(losses[0])
    for name in ("vae", "text_encoder"):
        after = getattr(c, name).state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before[name].items()), name
    after = c.unet.state_dict()
    changed = {k for k, v in before["unet"].items() if not torch.equal(v, after[k])}
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]


def test_sampling_returns_images_of_the_requested_size():
    c = tiny_components(32)
    images = generate(c, ["An image of a red circle."] * 3, image_size=32, inference_steps=2,
                      batch_size=2, seed=0, device=CPU)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    again = generate(c, ["An image of a red circle."] * 3, image_size=32, inference_steps=2,
                     batch_size=2, seed=0, device=CPU)
    assert torch.equal(images, again)  # seeded


def test_fid_with_injected_features():
    name, metric = make_fid("offline")
    assert name == "fid_offline_features" and isinstance(metric.inception, OfflineFeatures)
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    dark = (torch.rand(16, 3, 32, 32, generator=g) * 60).to(torch.uint8)
    same = compute_fid(real, real, metric)
    other = compute_fid(real, dark, metric)
    assert abs(same) < 1e-6
    assert other > 1e-3 and other > 1000 * abs(same)


def test_sampling_and_fid_show_progress_when_asked(monkeypatch, capsys):
    monkeypatch.setenv("PEFTVISION_PROGRESS", "1")
    images = generate(tiny_components(32), ["An image of a red circle."] * 3, image_size=32,
                      inference_steps=1, batch_size=2, seed=0, device=CPU)
    compute_fid(images, images, make_fid("offline")[1], batch_size=2)
    err = capsys.readouterr().err
    for desc in ("sampling", "FID features (real)", "FID features (generated)"):
        assert f"{desc}:" in err
    monkeypatch.setenv("PEFTVISION_PROGRESS", "0")
    compute_fid(images, images, make_fid("offline")[1], batch_size=2)
    assert capsys.readouterr().err == ""


def test_local_component_folder_round_trip(tmp_path):
    c = tiny_components(32)
    loaded = load_components(str(c.save_pretrained(tmp_path / "sd")))
    assert all(torch.equal(v, loaded.unet.state_dict()[k]) for k, v in c.unet.state_dict().items())
    prompt = ["An image of a blue square."]
    assert loaded.tokenizer(prompt).input_ids == c.tokenizer(prompt).input_ids
    assert loaded.scheduler.config.num_train_timesteps == 1000


def test_cli_hook_parses_generate():
    parser = argparse.ArgumentParser()
    add_generation_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", "--model", "tiny", "--data", "demo", "--method",
                              "bias+norm", "--steps", "3"])
    assert args.command == "generate" and args.steps == 3 and callable(args.func)


def test_tiny_end_to_end_writes_result_json(demo_dir, tmp_path):
    result = main(["--model", "tiny", "--data", f"imagefolder-with-captions:{demo_dir}",
                   "--method", "lora", "--steps", "2", "--image-size", "32", "--batch-size", "2",
                   "--num-samples", "4", "--inference-steps", "2", "--fid-features", "offline",
                   "--out", str(tmp_path / "runs")])
    run_dir = tmp_path / "runs" / result["adapter"]["run"]
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["kind"] == "peftvision-benchmark-run" and saved["task"] == "text-to-image"
    assert math.isfinite(saved["metrics"]["fid_offline_features"])
    assert "fid_inception" not in saved["metrics"]
    assert saved["metrics"]["num_generated"] == 4
    assert 0 < saved["parameters"]["trainable"] < saved["parameters"]["total"]
    assert saved["parameters"]["by_method"] == {"lora": saved["parameters"]["trainable"]}
    assert saved["adapter"]["bytes"] > 0 and saved["environment"]["git"]["sha"]
    assert (run_dir / "samples.png").is_file()
    adapter_config = json.loads((run_dir / "adapter_config.json").read_text())
    assert saved["method"]["configs"] == {m["name"]: m["config"] for m in adapter_config["methods"]}
    pv.load_adapter(tiny_components(32).unet, run_dir)  # the adapter fits a fresh tiny base
