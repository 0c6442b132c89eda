"""Hub push/pull with the HfApi / snapshot_download calls mocked (no network here)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors as hf_errors
from models import make_inputs, make_model, run

import peftvision as pv
import peftvision.hub


class FakeApi:
    """Records calls and keeps a copy of each uploaded folder, like a tiny local Hub."""

    calls: list = []
    uploads: list[Path] = []
    store: Path

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        FakeApi.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        FakeApi.calls.append(("upload_folder", repo_id, kw))
        dest = FakeApi.store / repo_id.replace("/", "--")
        shutil.copytree(folder_path, dest, dirs_exist_ok=True)
        FakeApi.uploads.append(dest)
        return type("CommitInfo", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()


class FakeResponse:
    status_code = 404
    headers: dict = {}
    url = "https://hub.invalid"
    request = None


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    FakeApi.calls, FakeApi.uploads, FakeApi.store = [], [], tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(peftvision.hub, "offline_reason", lambda timeout=3.0: None)  # "online"

    def snapshot_download(repo_id, revision=None, **kw):
        folder = FakeApi.store / repo_id.replace("/", "--")
        if not folder.is_dir():
            raise hf_errors.RepositoryNotFoundError(f"{repo_id} not found", response=FakeResponse())
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return FakeApi


def trained_vit():
    model = pv.apply(make_model("vit"), "lora", r=2)
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B.normal_()
    return model.eval()


def test_push_uploads_adapter_and_card_in_one_commit(fake_hub):
    model = trained_vit()
    url = pv.push_to_hub(model, "me/vit-lora", private=True, revision="v1",
                         commit_message="first", tags=["medical-imaging"], metrics={"f1": 0.87})
    assert url.endswith("/commit/1")
    kinds = [c[0] for c in fake_hub.calls]
    assert kinds.count("upload_folder") == 1
    assert ("create_repo", "me/vit-lora", {"private": True, "exist_ok": True, "repo_type": "model"}) in fake_hub.calls
    upload = next(c for c in fake_hub.calls if c[0] == "upload_folder")
    assert upload[2]["revision"] == "v1" and upload[2]["commit_message"] == "first"
    files = sorted(p.name for p in fake_hub.uploads[0].iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (fake_hub.uploads[0] / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: peftvision" in front
    assert "- medical-imaging" in front and "- lora" in front
    assert "| f1 | 0.87 |" in card
    assert "pv.load_adapter" in card
    assert f"{pv.report(model).trainable:,}" in card


def test_pull_loads_like_a_folder(fake_hub):
    model = trained_vit()
    pv.push_to_hub(model, "me/vit-lora")
    fresh = pv.load_adapter(make_model("vit"), "me/vit-lora")
    inputs = make_inputs("vit")
    with torch.no_grad():
        assert torch.equal(run(model, inputs), run(fresh.eval(), inputs))


def test_pull_missing_repo_is_clear(fake_hub):
    with pytest.raises(pv.AdapterLoadError, match="not found"):
        pv.load_adapter(make_model("vit"), "me/nothing-here")


def test_pull_repo_without_adapter(fake_hub):
    (fake_hub.store / "me--empty").mkdir(parents=True)
    with pytest.raises(pv.AdapterLoadError, match="holds no peftvision adapter"):
        pv.load_adapter(make_model("vit"), "me/empty")


def test_pull_adapter_for_another_base(fake_hub):
    pv.push_to_hub(trained_vit(), "me/vit-lora")
    resnet = make_model("resnet")
    with pytest.raises(pv.AdapterLoadError, match="saved for"):
        pv.load_adapter(resnet, "me/vit-lora")
    assert pv.applied(resnet) is None


def test_pull_offline_with_nothing_cached(monkeypatch):
    def offline(*a, **kw):
        raise hf_errors.LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(pv.AdapterLoadError, match="not in the local Hub cache"):
        pv.load_adapter(make_model("vit"), "me/vit-lora")


def test_not_a_repo_id_nor_folder():
    with pytest.raises(pv.AdapterLoadError, match="does not exist"):
        pv.load_adapter(make_model("vit"), "no/such/folder")


def test_push_without_adapter_fails_before_uploading(fake_hub):
    with pytest.raises(pv.NotAppliedError):
        pv.push_to_hub(make_model("vit"), "me/x")
    assert not fake_hub.calls[1:]  # only HfApi() was built: nothing created or uploaded


def test_cli_push_uploads_a_saved_folder(fake_hub, tmp_path, capsys):
    from peftvision.cli import main

    pv.save_adapter(trained_vit(), tmp_path / "adapter")
    main(["push", str(tmp_path / "adapter"), "me/from-cli", "--revision", "v2"])
    assert capsys.readouterr().out.strip().endswith("/commit/1")
    upload = next(c for c in fake_hub.calls if c[0] == "upload_folder")
    assert upload[1] == "me/from-cli" and upload[2]["revision"] == "v2"
    assert (fake_hub.uploads[0] / "adapter_model.safetensors").is_file()


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Offline mode off, and an endpoint where nothing listens (refused at once)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


def test_offline_reason(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as `make test` sets HF_HUB_OFFLINE=1
    assert peftvision.hub.offline_reason() == "HF_HUB_OFFLINE is set"


def test_offline_reason_without_offline_mode(unreachable_hub):
    assert peftvision.hub.offline_reason().startswith("no connection to 127.0.0.1:9")


def test_push_offline_fails_at_once_and_uploads_nothing(unreachable_hub, monkeypatch, tmp_path):
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    start = time.perf_counter()
    with pytest.raises(pv.OfflineError, match="cannot push to 'me/x': the Hub is unreachable"):
        pv.push_to_hub(trained_vit(), "me/x")
    assert time.perf_counter() - start < 10  # no minute of retries
    assert FakeApi.calls == []


def test_pull_unreachable_reads_the_cache_without_retries(unreachable_hub, monkeypatch):
    from huggingface_hub import constants

    seen = []

    def snapshot_download(*a, **kw):
        seen.append(constants.HF_HUB_OFFLINE)  # offline mode: cache only, no retries
        raise hf_errors.LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(pv.AdapterLoadError, match="not in the local Hub cache"):
        pv.load_adapter(make_model("vit"), "me/vit-lora")
    assert seen == [True] and constants.HF_HUB_OFFLINE is False  # restored afterwards


def test_cli_push_offline_is_one_line(unreachable_hub, tmp_path):
    from peftvision.cli import main

    pv.save_adapter(trained_vit(), tmp_path / "adapter")
    with pytest.raises(SystemExit) as info:
        main(["push", str(tmp_path / "adapter"), "me/x"])
    assert str(info.value).startswith("peftvision: cannot push to 'me/x': the Hub is unreachable")
