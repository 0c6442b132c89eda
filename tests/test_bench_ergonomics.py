"""Benchmarks for a new user: progress lines in logs, the model's own image size, an honest run
counter, and an immediate error when pretrained weights cannot be fetched offline."""

import time

import pytest

from benchmarks.cli import run_many
from benchmarks.heartbeat import Heartbeat
from benchmarks.models import ModelError, build_model, default_image_size
from benchmarks.train import RunConfig, run_experiment

TINY = dict(dataset="demo:12", model="tiny-resnet", pretrained=False, epochs=1, batch_size=4)


def test_heartbeat_is_due_every_interval():
    now = [0.0]
    beat = Heartbeat(every=30, clock=lambda: now[0])
    seen = []
    for t in (10, 29, 31, 40, 61, 62):
        now[0] = t
        seen.append(beat.due())
    assert seen == [False, False, True, False, True, False]
    assert not Heartbeat(active=False, every=0).due()


def test_progress_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setenv("PEFTVISION_PROGRESS_EVERY", "0")  # a line after every batch
    monkeypatch.delenv("PEFTVISION_PROGRESS", raising=False)
    run_experiment(RunConfig(**TINY, method="bias"))
    err = capsys.readouterr().err  # captured: not a terminal, so no tqdm bar
    assert "[bias] epoch 1/1:" in err and "batches (the first epoch also decodes the images)" in err
    assert "[bias] epoch 1/1: batch 1/" in err and "loss " in err


def test_quiet_runs_print_no_progress_lines(monkeypatch, capsys):
    monkeypatch.setenv("PEFTVISION_PROGRESS_EVERY", "0")
    run_experiment(RunConfig(**TINY, method="bias", quiet=True))
    assert "batch 1/" not in capsys.readouterr().err


@pytest.mark.parametrize("model, size", [("tiny-resnet", 32), ("tiny-vit", 32), ("resnet50", 224),
                                         ("vit_base_patch16_384", 384),
                                         ("convnext_tiny.fb_in22k_ft_in1k_384", 384)])
def test_image_size_defaults_to_the_models_own(model, size):
    assert default_image_size(model) == size
    assert RunConfig(dataset="demo", model=model, method="bias").image_size == size
    assert RunConfig(dataset="demo", model=model, method="bias", image_size=64).image_size == 64


def test_run_counter_counts_only_runs_that_run():
    said = []
    configs = [RunConfig(**TINY, method="tsa", seed=0),  # tsa: ResNets only
               RunConfig(**{**TINY, "model": "tiny-vit"}, method="tsa", seed=0),
               RunConfig(**TINY, method="bias", seed=0)]
    results, notes = run_many(configs, say=said.append)
    assert len(results) == 2 and len(notes) == 1 and notes[0].startswith("skipped tsa on tiny-vit")
    counters = [s.split("]")[0] + "]" for s in said if s.startswith("[")]
    assert counters == ["[1/2]", "[2/2]"]


def test_pretrained_weights_offline_fail_at_once(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline mode not declared...
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # ...but nothing answers
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    with pytest.raises(ModelError) as info:
        build_model("resnet10t", 2, 224, pretrained=True)
    assert time.perf_counter() - start < 15  # huggingface_hub alone retries for ~50 s
    message = str(info.value)
    assert "offline: no connection to 127.0.0.1:9" in message
    assert "--weights FILE" in message and "--no-pretrained" in message
