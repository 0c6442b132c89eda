"""save_adapter / load_adapter: files, config, exactly the trained tensors, bitwise round trips
onto a fresh base, strict loading, corruption detection, atomic writes, and no pickle."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import stat
import struct

import pytest
import torch
from models import loss_fn, make_inputs, make_model, make_target, run, tiny_resnet, tiny_vit
from safetensors.torch import load_file
from torch import nn

import peftvision as pv
import peftvision.checkpoint as ckpt
from peftvision import AdapterLoadError, CorruptAdapterError
from peftvision.identity import base_identity
from peftvision.layers import AdapterLayer

FILES = {"adapter_model.safetensors", "adapter_config.json", "README.md"}
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def train(model: nn.Module, arch: str, steps: int = 3, lr: float = 0.1) -> nn.Module:
    """A few SGD steps in train mode (BatchNorm running statistics move too), then eval."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    inputs = make_inputs(arch)
    model.train()
    for step in range(steps):
        out = run(model, inputs)
        loss = loss_fn(arch, out, make_target(arch, out, seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def outputs(model: nn.Module, arch: str) -> torch.Tensor:
    return run(model.eval(), make_inputs(arch))


class Snapshot:
    """What a failed load must not change."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.types = [(name, type(m)) for name, m in model.named_modules()]
        self.grads = {name: p.requires_grad for name, p in model.named_parameters()}
        record = pv.applied(model)
        self.methods = record.names if record else None

    def assert_unchanged(self, model: nn.Module) -> None:
        state = model.state_dict()
        assert list(state) == list(self.state)
        for key, value in self.state.items():
            assert torch.equal(state[key], value), key
        assert [(name, type(m)) for name, m in model.named_modules()] == self.types
        assert {name: p.requires_grad for name, p in model.named_parameters()} == self.grads
        if self.methods is None:
            assert pv.applied(model) is None
        else:
            assert pv.applied(model).names == self.methods


def load_fails(model: nn.Module, folder, exc_type, *phrases: str) -> str:
    snap = Snapshot(model)
    with pytest.raises(exc_type) as info:
        pv.load_adapter(model, folder)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    snap.assert_unchanged(model)
    return message


@pytest.fixture
def vit_lora_dir(tmp_path):
    """A ViT + LoRA adapter trained a little and saved; (model, folder)."""
    model = train(pv.apply(make_model("vit"), "lora", r=2), "vit")
    folder = tmp_path / "vit_lora"
    pv.save_adapter(model, folder)
    return model, folder


# ---- what is written ------------------------------------------------------------------------

def test_files_and_config(vit_lora_dir):
    model, folder = vit_lora_dir
    assert {p.name for p in folder.iterdir()} == FILES  # no temp files left behind
    config = json.loads((folder / CONFIG).read_text())
    assert config["peftvision_version"] == pv.__version__
    assert config["format_version"] == 1
    assert config["architecture"] == "vit"
    assert config["train_head"] is True
    assert [m["name"] for m in config["methods"]] == ["lora"]
    lora_cfg = config["methods"][0]["config"]
    assert lora_cfg["r"] == 2 and lora_cfg["alpha"] is None and lora_cfg["dropout"] == 0.0
    base = config["base_model"]
    assert base["class"] == "timm.models.vision_transformer.VisionTransformer"
    # the fingerprint identifies the architecture: equal for another instance (other weights),
    # different for another depth
    assert base["fingerprint"] == base_identity(make_model("vit", seed=5))["fingerprint"]
    assert base["fingerprint"] != base_identity(tiny_vit(depth=3))["fingerprint"]
    data = (folder / WEIGHTS).read_bytes()
    assert config["weights_sha256"] == hashlib.sha256(data).hexdigest()
    card = (folder / "README.md").read_text()
    assert "library_name: peftvision" in card and "- lora" in card


def test_weights_file_is_safetensors_not_pickle(vit_lora_dir):
    _, folder = vit_lora_dir
    data = (folder / WEIGHTS).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header size, JSON header
    header = json.loads(data[8:8 + header_len])
    assert header["__metadata__"]["library"] == "peftvision"
    assert not data.startswith(b"PK") and not data.startswith(b"\x80")  # torch zip / raw pickle


def test_saved_keys_lora_vit_are_lora_and_head_only(vit_lora_dir):
    model, folder = vit_lora_dir
    saved = load_file(folder / WEIGHTS)
    depth = len(model.blocks)
    expected = {f"blocks.{i}.attn.qkv.lora_{ab}" for i in range(depth) for ab in "AB"}
    assert set(saved) == expected | {"head.weight", "head.bias"}
    live = dict(model.named_parameters())
    for key, tensor in saved.items():
        assert torch.equal(tensor, live[key].detach()), key
        assert live[key].requires_grad, f"{key} is saved but was not trained"
    # and every trained tensor is saved
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(saved)


def test_saved_keys_bias_resnet_include_batchnorm_statistics(tmp_path):
    base = make_model("resnet")
    biases = {n for n, _ in base.named_parameters() if n.rpartition(".")[2] == "bias"}
    bn_stats = {f"{name}.{buf}" for name, m in base.named_modules() if isinstance(m, nn.BatchNorm2d)
                for buf in ("running_mean", "running_var", "num_batches_tracked")}
    assert biases and bn_stats
    model = train(pv.apply(base, "bias"), "resnet")
    pv.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / WEIGHTS)
    assert set(saved) == biases | {"fc.weight"} | bn_stats
    assert all(saved[f"{name}.num_batches_tracked"] == 3 for name, m in model.named_modules()
               if isinstance(m, nn.BatchNorm2d))


def test_saved_keys_ssf_resnet(tmp_path):
    base = make_model("resnet")
    bns = [name for name, m in base.named_modules() if isinstance(m, nn.BatchNorm2d)]
    model = pv.apply(base, "ssf")
    pv.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / WEIGHTS)
    ssf = {f"{n}.ssf_{p}" for n in bns for p in ("scale", "shift")}
    stats = {f"{n}.base_layer.{b}" for n in bns for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert set(saved) == ssf | stats | {"fc.weight", "fc.bias"}


# ---- round trips ----------------------------------------------------------------------------

ROUND_TRIPS = [
    ("resnet", "batchnorm", {}),
    ("resnet", "ssf", {}),
    ("resnet", "lora", {"r": 2}),
    ("resnet", ["bias", "lora"], {}),
    ("vit", "lora", {"r": 2, "qkv_parts": "qv"}),
    ("vit", ["layernorm", "ssf"], {}),
    ("unet", "lora", {"r": 2}),
    ("unet", "bias", {}),
]


@pytest.mark.parametrize("arch, method, cfg", ROUND_TRIPS,
                         ids=[f"{a}-{'+'.join([m] if isinstance(m, str) else m)}" for a, m, _ in ROUND_TRIPS])
def test_round_trip_onto_a_fresh_base(arch, method, cfg, tmp_path):
    base_out = outputs(make_model(arch, seed=0), arch)
    model = train(pv.apply(make_model(arch, seed=0), method, **cfg), arch)
    trained_out = outputs(model, arch)
    assert (trained_out - base_out).abs().max() > 1e-4, "training did not change the outputs"
    pv.save_adapter(model, tmp_path)

    fresh = make_model(arch, seed=0)  # same architecture and base weights
    assert pv.load_adapter(fresh, tmp_path) is fresh
    # same ops on the same tensors in the same order: bitwise equal on CPU
    assert torch.equal(outputs(fresh, arch), trained_out)
    assert {n: p.requires_grad for n, p in fresh.named_parameters()} == \
        {n: p.requires_grad for n, p in model.named_parameters()}
    assert pv.report(fresh).to_dict() == pv.report(model).to_dict()
    state = fresh.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


def test_adapter_carries_only_the_trained_tensors(vit_lora_dir, tmp_path):
    # onto a base with other (frozen) weights, the adapter loads but the outputs differ:
    # the frozen base is not in the file
    model, folder = vit_lora_dir
    other = make_model("vit", seed=1)
    pv.load_adapter(other, folder)
    assert not torch.allclose(outputs(other, "vit"), outputs(model, "vit"))
    assert (folder / WEIGHTS).stat().st_size < 0.5 * sum(
        p.numel() * 4 for p in model.parameters())


def test_round_trip_after_two_applies_with_train_head_false(tmp_path):
    # apply(..., train_head=False) then apply(...) with the default train_head=True: the second
    # call made the head trainable, so the saved adapter must record (and reload) it
    model = pv.apply(make_model("vit"), "lora", r=2, train_head=False)
    pv.apply(model, "bias")
    model = train(model, "vit")
    pv.save_adapter(model, tmp_path)
    fresh = make_model("vit")
    pv.load_adapter(fresh, tmp_path)
    assert torch.equal(outputs(fresh, "vit"), outputs(model, "vit"))


def test_saving_twice_overwrites(tmp_path):
    model = pv.apply(make_model("vit"), "lora", r=2)
    pv.save_adapter(model, tmp_path)
    train(model, "vit")
    pv.save_adapter(model, tmp_path, card=False)
    # the older save's card described the older adapter: it goes with it
    assert {p.name for p in tmp_path.iterdir()} == FILES - {"README.md"}
    fresh = make_model("vit")
    pv.load_adapter(fresh, tmp_path)
    assert torch.equal(outputs(fresh, "vit"), outputs(model, "vit"))


# ---- loading onto the wrong model -----------------------------------------------------------

@pytest.mark.parametrize("other, phrases", [
    (lambda: tiny_resnet(), ["missing keys", "unexpected keys", "blocks.0.attn.qkv.lora_A",
                             "VisionTransformer", "ResNet"]),
    (lambda: tiny_vit(depth=3), ["missing keys (2): blocks.2.attn.qkv.lora_A, blocks.2.attn.qkv.lora_B"]),
    (lambda: tiny_vit(num_classes=7), ["shape mismatches", "head.weight: saved (5, 32), model (7, 32)"]),
], ids=["vit-onto-resnet", "depth2-onto-depth3", "5-onto-7-classes"])
def test_loading_onto_another_architecture(vit_lora_dir, other, phrases):
    _, folder = vit_lora_dir
    torch.manual_seed(0)
    model = other()
    load_fails(model, folder, AdapterLoadError, *phrases)


def test_loading_onto_a_model_with_an_adapter(vit_lora_dir):
    _, folder = vit_lora_dir
    model = pv.apply(make_model("vit"), "bias")
    load_fails(model, folder, AdapterLoadError, "already has peftvision methods", "unload")


def test_unknown_method_in_config(vit_lora_dir):
    _, folder = vit_lora_dir
    config = json.loads((folder / CONFIG).read_text())
    config["methods"][0]["name"] = "tsa2"
    (folder / CONFIG).write_text(json.dumps(config))
    load_fails(make_model("vit"), folder, pv.PeftVisionError, "tsa2")


# ---- corrupt and missing files --------------------------------------------------------------

def _edit_config(folder, **changes):
    config = json.loads((folder / CONFIG).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / CONFIG).write_text(json.dumps(config))


def test_truncated_weights(vit_lora_dir):
    _, folder = vit_lora_dir
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    load_fails(make_model("vit"), folder, CorruptAdapterError, WEIGHTS, "truncated")


def test_truncated_weights_without_checksum(vit_lora_dir):
    # an older or hand-edited config without weights_sha256: the safetensors parser catches it
    _, folder = vit_lora_dir
    _edit_config(folder, weights_sha256=None)
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    load_fails(make_model("vit"), folder, CorruptAdapterError, WEIGHTS, "truncated or corrupt")


@pytest.mark.parametrize("checksum", [True, False])
def test_garbage_weights(vit_lora_dir, checksum):
    _, folder = vit_lora_dir
    if not checksum:
        _edit_config(folder, weights_sha256=None)
    (folder / WEIGHTS).write_bytes(os.urandom(4096))
    load_fails(make_model("vit"), folder, CorruptAdapterError, WEIGHTS)


def test_weights_from_another_save(vit_lora_dir, tmp_path):
    _, folder = vit_lora_dir
    other = pv.apply(make_model("vit", seed=3), "lora", r=2)
    pv.save_adapter(other, tmp_path / "other")
    (folder / WEIGHTS).write_bytes((tmp_path / "other" / WEIGHTS).read_bytes())
    load_fails(make_model("vit"), folder, CorruptAdapterError, "another save")


@pytest.mark.parametrize("text", ['{"methods": [', "\xff\xfe not json", "[1, 2]", '{"methods": []}'],
                         ids=["truncated", "garbage", "not-an-object", "no-base-model"])
def test_corrupt_config(vit_lora_dir, text):
    _, folder = vit_lora_dir
    (folder / CONFIG).write_text(text, encoding="latin-1")
    load_fails(make_model("vit"), folder, CorruptAdapterError, CONFIG, "corrupt")


def test_newer_format_version_asks_to_upgrade(vit_lora_dir):
    _, folder = vit_lora_dir
    _edit_config(folder, format_version=99)
    message = load_fails(make_model("vit"), folder, AdapterLoadError, "format 99", "Upgrade",
                         "pip install -U peftvision")
    assert "reads formats up to 1" in message


@pytest.mark.parametrize("name", [WEIGHTS, CONFIG])
def test_missing_file(vit_lora_dir, name):
    _, folder = vit_lora_dir
    (folder / name).unlink()
    load_fails(make_model("vit"), folder, AdapterLoadError, f"no {name}", "save_adapter")


def test_missing_folder(tmp_path):
    # a path that is not a folder and not a 'user/name' Hub id: no network access attempted
    load_fails(make_model("vit"), tmp_path / "nowhere" / "adapter", AdapterLoadError,
               "does not exist", "check the path")


# ---- atomic writes --------------------------------------------------------------------------

def _crash_on(monkeypatch, target_name: str, how: str) -> None:
    """Make the write of `target_name` fail: in fsync (data half written) or in the rename."""
    if how == "replace":
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)) == target_name:
                raise OSError("simulated crash in os.replace")
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(ckpt.os, "replace", replace)
    else:
        real_fsync = os.fsync

        def fsync(fd):
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{target_name}."):
                raise OSError("simulated crash in os.fsync")
            return real_fsync(fd)

        monkeypatch.setattr(ckpt.os, "fsync", fsync)


@pytest.mark.parametrize("target", [WEIGHTS, CONFIG, "README.md"])
def test_crash_while_staging_keeps_the_previous_adapter(vit_lora_dir, monkeypatch, target):
    # a failure before the commit point (a file half written) leaves the old adapter, no temp files
    model, folder = vit_lora_dir
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    expected = outputs(model, "vit")
    train(model, "vit")  # the next save would write other weights
    _crash_on(monkeypatch, target, "fsync")
    with pytest.raises(OSError, match="simulated crash"):
        pv.save_adapter(model, folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temp files either
    fresh = make_model("vit")
    pv.load_adapter(fresh, folder)
    assert torch.equal(outputs(fresh, "vit"), expected)


@pytest.mark.parametrize("target", [WEIGHTS, CONFIG])
def test_crash_after_the_commit_point_rolls_forward(vit_lora_dir, monkeypatch, target):
    # the journal was committed, then a rename failed: the folder is mid-way, and the next load
    # (under the folder lock) finishes the save: the complete new adapter, never a mix
    model, folder = vit_lora_dir
    train(model, "vit")
    expected = outputs(model, "vit")
    _crash_on(monkeypatch, target, "replace")
    with pytest.raises(OSError, match="simulated crash"):
        pv.save_adapter(model, folder)
    monkeypatch.undo()
    assert ".peftvision-commit" in {p.name for p in folder.iterdir()}
    fresh = make_model("vit")
    pv.load_adapter(fresh, folder)
    assert torch.equal(outputs(fresh, "vit"), expected)
    assert {p.name for p in folder.iterdir()} == FILES


# ---- no pickle ------------------------------------------------------------------------------

def test_load_never_unpickles(vit_lora_dir, monkeypatch):
    model, folder = vit_lora_dir

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle-based loading was called")

    for owner, name in [(torch, "load"), (torch.serialization, "load"), (pickle, "load"),
                        (pickle, "loads")]:
        monkeypatch.setattr(owner, name, forbidden)
    fresh = make_model("vit")
    pv.load_adapter(fresh, folder)
    monkeypatch.undo()
    assert torch.equal(outputs(fresh, "vit"), outputs(model, "vit"))


def test_loaded_model_merges_and_unloads(vit_lora_dir):
    # a loaded model is a normal peftvision model: merge / unload(merge=True) work on it.
    # Merging changes the fp32 summation order, hence allclose instead of equality.
    model, folder = vit_lora_dir
    fresh = make_model("vit")
    pv.load_adapter(fresh, folder)
    expected = outputs(model, "vit")
    pv.merge(fresh)
    assert all(m.merged for m in fresh.modules() if isinstance(m, AdapterLayer))
    torch.testing.assert_close(outputs(fresh, "vit"), expected, rtol=1e-5, atol=1e-5)
    plain = pv.unload(copy.deepcopy(fresh), merge=True)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(outputs(plain, "vit"), expected, rtol=1e-5, atol=1e-5)


def test_saved_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = pv.save_adapter(pv.apply(make_model("vit"), "bias"), tmp_path / "a")
    finally:
        os.umask(old)
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o644}


def test_save_refuses_a_merged_model(tmp_path):
    model = pv.merge(pv.apply(make_model("vit"), ["lora", "bias"]))
    with pytest.raises(pv.MergeError, match="unmerge"):
        pv.save_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())
