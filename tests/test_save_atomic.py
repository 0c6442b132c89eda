"""An adapter folder is saved as one unit: crashes (SIGKILL), concurrent writers and readers,
arguments checked before any write, and no stale files from an older save."""

from __future__ import annotations

import copy
import os
import random
import signal
import threading
import time

import pytest
import torch
from models import make_inputs, make_model, run

import peftvision as pv
from peftvision.folder import JOURNAL

FILES = {"adapter_model.safetensors", "adapter_config.json", "README.md"}


def lora_model(seed: int):
    """A ViT + LoRA whose adapter differs per seed (B is non-zero)."""
    model = pv.apply(make_model("vit"), "lora", r=2)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model.eval()


@torch.no_grad()
def outputs(model):
    return run(model.eval(), make_inputs("vit"))


_BASE = make_model("vit")  # copied, not rebuilt: threads must not race on the global seed


def loaded_outputs(folder):
    fresh = copy.deepcopy(_BASE)
    pv.load_adapter(fresh, folder)
    return outputs(fresh)


def which(out, candidates) -> int:
    """Index of the candidate output `out` equals exactly; fails on a mix."""
    matches = [i for i, c in enumerate(candidates) if torch.equal(out, c)]
    assert len(matches) == 1, "the folder held neither adapter: a mixed or broken save"
    return matches[0]


def no_leftovers(folder) -> None:
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert not hidden, hidden


@pytest.fixture(scope="module")
def two_models():
    models = [lora_model(1), lora_model(2)]
    return models, [outputs(m) for m in models]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_at_any_moment_leaves_old_or_new(tmp_path, two_models):
    models, expected = two_models
    folder = tmp_path / "adapter"
    pv.save_adapter(models[0], folder)
    rng = random.Random(0)
    seen = set()
    for _ in range(12):
        pid = os.fork()
        if pid == 0:  # child: save the two adapters in turn until killed
            try:
                i = 1
                while True:
                    pv.save_adapter(models[i % 2], folder)
                    i += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.add(which(loaded_outputs(folder), expected))
        no_leftovers(folder)  # the load finished or discarded the interrupted save
        assert {p.name for p in folder.iterdir()} == FILES
    assert seen  # at least one state was observed (both, almost always)


def test_concurrent_writers_and_readers_never_mix(tmp_path, two_models):
    models, expected = two_models
    folder = tmp_path / "adapter"
    pv.save_adapter(models[0], folder)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(i: int) -> None:
        try:
            for _ in range(4):
                pv.save_adapter(models[i % 2], folder)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            while not stop.is_set():
                which(loaded_outputs(folder), expected)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors
    which(loaded_outputs(folder), expected)
    no_leftovers(folder)
    assert {p.name for p in folder.iterdir()} == FILES


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_concurrent_processes_serialise(tmp_path, two_models):
    models, expected = two_models
    folder = tmp_path / "adapter"
    pv.save_adapter(models[0], folder)
    children = []
    for i in range(3):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for _ in range(4):
                    pv.save_adapter(models[i % 2], folder)
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)
        children.append(pid)
    for _ in range(6):  # read while they write
        which(loaded_outputs(folder), expected)
    for pid in children:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    which(loaded_outputs(folder), expected)
    no_leftovers(folder)


@pytest.mark.parametrize("kwargs, phrase", [
    ({"metrics": {"auroc": None}}, "finite numbers"),
    ({"metrics": {"auroc": float("nan")}}, "finite numbers"),
    ({"metrics": [0.9]}, "dict"),
    ({"tags": "medical"}, "list of non-empty strings"),
    ({"tags": [3]}, "list of non-empty strings"),
    ({"format": "kohya-typo"}, "format must be one of"),
    ({"card": "no"}, "card must be True or False"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, two_models, kwargs, phrase):
    models, _ = two_models
    folder = tmp_path / "adapter"
    pv.save_adapter(models[0], folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match=phrase):
        pv.save_adapter(models[1], folder, **kwargs)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    fresh_folder = tmp_path / "never"
    with pytest.raises(ValueError, match=phrase):
        pv.save_adapter(models[1], fresh_folder, **kwargs)
    assert not fresh_folder.exists()


def test_no_stale_card_or_files_from_an_older_save(tmp_path, two_models):
    models, expected = two_models
    folder = tmp_path / "adapter"
    pv.save_adapter(models[0], folder)
    pv.save_adapter(models[1], folder, format="peft")
    assert {p.name for p in folder.iterdir()} == FILES - {"README.md"}  # old card went with it
    pv.save_adapter(models[0], folder, card=False)
    assert {p.name for p in folder.iterdir()} == FILES - {"README.md"}
    assert torch.equal(loaded_outputs(folder), expected[0])


def test_a_readme_the_user_wrote_is_kept(tmp_path, two_models):
    models, _ = two_models
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").write_text("# my experiment notes\n")
    (folder / "metrics.csv").write_text("epoch,f1\n")
    pv.save_adapter(models[0], folder, card=False)
    assert (folder / "README.md").read_text() == "# my experiment notes\n"
    assert (folder / "metrics.csv").exists()


def test_unet_peft_save_then_peftvision_save_removes_diffusers_file(tmp_path):
    model = pv.apply(make_model("unet"), "lora", r=2)
    folder = tmp_path / "unet"
    pv.save_adapter(model, folder, format="peft")
    assert (folder / "pytorch_lora_weights.safetensors").exists()
    pv.save_adapter(model, folder)
    assert {p.name for p in folder.iterdir()} == FILES


def test_an_interrupted_uncommitted_save_is_cleaned_by_the_next_save(tmp_path, two_models):
    models, expected = two_models
    folder = tmp_path / "adapter"
    pv.save_adapter(models[0], folder)
    (folder / ".adapter_model.safetensors.deadbeef0000.pvtmp").write_bytes(b"half")
    (folder / JOURNAL).write_text("not json")  # a torn journal is never ours: ignored
    pv.save_adapter(models[1], folder)
    no_leftovers(folder)
    assert torch.equal(loaded_outputs(folder), expected[1])
