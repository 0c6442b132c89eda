"""Adapters from untrusted places: wrong JSON shapes, wrong dtypes, huge configs in tiny files,
bad sparse indices, mistyped paths, card injection, other pretrained weights; and bad apply
arguments."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import timm
import torch
import yaml
from models import make_inputs, make_model, run
from safetensors.torch import load_file, save_file

import peftvision as pv
from peftvision import AdapterLoadError, ConfigError, CorruptAdapterError
from peftvision.methods import lora as lora_module

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture
def saved(tmp_path):
    model = pv.apply(make_model("vit"), "lora", r=2)
    folder = tmp_path / "a"
    pv.save_adapter(model, folder)
    return folder


def edit_config(folder, edit) -> None:
    config = json.loads((folder / CONFIG).read_text())
    edit(config)
    (folder / CONFIG).write_text(json.dumps(config))


def rewrite_weights(folder, edit) -> None:
    """Change the tensors and keep the config's checksum in step (a deliberate, 'valid' file)."""
    tensors = edit(load_file(folder / WEIGHTS))
    save_file(tensors, folder / WEIGHTS)
    digest = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    edit_config(folder, lambda c: c.update(weights_sha256=digest))


def refused(folder, exc_type, *phrases, model=None):
    model = model if model is not None else make_model("vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc_type) as info:
        pv.load_adapter(model, folder)
    for phrase in phrases:
        assert phrase in str(info.value), str(info.value)
    assert pv.applied(model) is None
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("edit, phrase", [
    (lambda c: c.update(methods="lora"), '"methods" must be a non-empty list'),
    (lambda c: c.update(methods=[]), '"methods" must be a non-empty list'),
    (lambda c: c["methods"][0].pop("config"), 'each entry of "methods"'),
    (lambda c: c["methods"][0].update(name=3), 'each entry of "methods"'),
    (lambda c: c.update(base_model=None), '"base_model" must be an object'),
    (lambda c: c.pop("base_model"), '"base_model" must be an object'),
    (lambda c: c.update(train_head="yes"), '"train_head" must be true or false'),
    (lambda c: c.update(format_version="1"), '"format_version" must be an integer'),
    (lambda c: c["methods"][0].update(config=[1, 2]), 'each entry of "methods"'),
])
def test_config_of_the_wrong_shape_is_corrupt(saved, edit, phrase):
    edit_config(saved, edit)
    refused(saved, CorruptAdapterError, phrase)


def test_a_json_list_is_not_a_config(saved):
    (saved / CONFIG).write_text("[1, 2]")
    refused(saved, CorruptAdapterError, "not a peftvision config object")


def test_unknown_option_in_method_config(saved):
    edit_config(saved, lambda c: c["methods"][0]["config"].update(rank=4))
    refused(saved, AdapterLoadError, "unknown option")


def test_integer_tensors_in_place_of_float_weights(saved):
    rewrite_weights(saved, lambda t: {k: (v * 100).to(torch.int64) if "lora" in k else v
                                      for k, v in t.items()})
    refused(saved, AdapterLoadError, "dtype mismatches", "lora_A")


def test_bool_tensors_in_place_of_float_weights(saved):
    rewrite_weights(saved, lambda t: {k: (v > 0) if "head" in k else v for k, v in t.items()})
    refused(saved, AdapterLoadError, "dtype mismatches")


def test_huge_rank_in_a_tiny_file_fails_before_allocating(saved, monkeypatch):
    # r=10**7 on a 32-wide ViT would allocate ~2.5 GB of LoRA factors per layer: the check runs
    # on a meta-device copy, so no LoRA layer is ever built on a real device
    edit_config(saved, lambda c: c["methods"][0]["config"].update(r=10**7))
    devices = []
    real_init = lora_module.LoRALinear.__init__

    def spy(self, base_layer, *args, **kwargs):
        devices.append(base_layer.weight.device.type)
        real_init(self, base_layer, *args, **kwargs)

    monkeypatch.setattr(lora_module.LoRALinear, "__init__", spy)
    refused(saved, AdapterLoadError, "shape mismatches")
    assert devices and set(devices) == {"meta"}


@pytest.mark.parametrize("corrupt", [
    lambda idx: idx.flip(0),  # not sorted
    lambda idx: torch.cat([idx[:1], idx[:-1]]),  # a duplicate
    lambda idx: idx + 10**6,  # out of range
    lambda idx: idx - idx.max() - 1,  # negative
])
def test_sparse_indices_are_validated_at_load(tmp_path, corrupt):
    data = [(make_inputs("vit")[0], torch.tensor([0, 1]))]
    model = pv.apply(make_model("vit"), "shpeft", fraction=0.05, data=data)
    folder = tmp_path / "sparse"
    pv.save_adapter(model, folder)
    fresh = make_model("vit")
    pv.load_adapter(fresh, folder)  # the untouched file loads

    def edit(tensors):
        key = next(k for k, v in tensors.items() if "indices_" in k and v.numel() > 2)
        return {**tensors, key: corrupt(tensors[key]).contiguous()}

    rewrite_weights(folder, edit)
    refused(folder, CorruptAdapterError, "sorted unique positions")


def test_a_mistyped_local_path_says_the_folder_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(AdapterLoadError, match="'runs/typo' does not exist"):
        pv.load_adapter(make_model("vit"), "runs/typo")
    with pytest.raises(AdapterLoadError, match="does not exist"):
        pv.load_adapter(make_model("vit"), "./typo")


def test_card_metadata_is_escaped(tmp_path):
    model = pv.apply(make_model("vit"), "bias")
    folder = pv.save_adapter(model, tmp_path / "a", tags=["x\nlicense: evil", "medical"],
                             metrics={"f1 | macro\nbad": 0.5})
    text = (folder / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert "license" not in meta
    assert "x\nlicense: evil" in meta["tags"] and "medical" in meta["tags"]
    assert meta["library_name"] == "peftvision"
    assert "| f1 \\| macro bad | 0.5 |" in text


def timm_model(tag: str | None = None):
    model = timm.create_model("test_vit.r160_in1k", pretrained=False, num_classes=3)
    if tag is not None:  # the same architecture with other pretrained weights
        model.pretrained_cfg = {**model.pretrained_cfg, "tag": tag,
                                "hf_hub_id": f"timm/test_vit.{tag}"}
    return model


def test_card_names_the_real_hub_id_of_the_base(tmp_path):
    folder = pv.save_adapter(pv.apply(timm_model(), "bias"), tmp_path / "a")
    meta = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    assert meta["base_model"] == "timm/test_vit.r160_in1k"
    assert "timm.create_model('test_vit.r160_in1k'" in (folder / "README.md").read_text()
    config = json.loads((folder / CONFIG).read_text())
    assert config["base_model"]["pretrained_tag"] == "r160_in1k"


def test_loading_onto_other_pretrained_weights_warns(tmp_path):
    folder = pv.save_adapter(pv.apply(timm_model(), "bias"), tmp_path / "a")
    with pytest.warns(UserWarning, match="trained on timm/test_vit.r160_in1k"):
        pv.load_adapter(timm_model("other_tag"), folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pv.load_adapter(timm_model(), folder)


@pytest.mark.parametrize("method", [None, 3, {"lora": {}}])
def test_apply_with_no_method_is_a_config_error(method):
    model = make_model("vit")
    with pytest.raises(ConfigError, match="method must be a name"):
        pv.apply(model, method)
    assert pv.applied(model) is None
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("value", ["yes", 1, "False"])
def test_train_head_must_be_a_bool(value):
    model = make_model("vit")
    with pytest.raises(ConfigError, match="train_head must be True, False or None"):
        pv.apply(model, "lora", train_head=value)
    assert pv.applied(model) is None


# ---- models inside wrappers ----------------------------------------------------------------

def wrappers():
    yield "compile", lambda m: torch.compile(m, backend="eager")
    yield "dataparallel", torch.nn.DataParallel


@pytest.mark.parametrize("kind, wrap", list(wrappers()), ids=[k for k, _ in wrappers()])
def test_every_entry_point_sees_through_wrappers(tmp_path, kind, wrap):
    inputs = make_inputs("vit")
    model = make_model("vit")
    wrapped = wrap(model)
    assert pv.apply(wrapped, "lora", r=2) is wrapped
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    expected = run(model.eval(), inputs)
    assert pv.report(wrapped).trainable == pv.report(model).trainable > 0
    folder = pv.save_adapter(wrapped, tmp_path / kind)
    keys = load_file(folder / WEIGHTS)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys), sorted(keys)[:3]
    fresh = wrap(make_model("vit"))
    pv.load_adapter(fresh, folder)
    with torch.no_grad():
        torch.testing.assert_close(fresh(*inputs), expected, rtol=1e-5, atol=1e-5)
    pv.merge(wrapped)
    pv.unmerge(wrapped)
    assert pv.unload(wrapped) is wrapped
    assert pv.applied(model) is None


def test_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = pv.apply(make_model("vit"), "lora", r=2)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        folder = pv.save_adapter(ddp, tmp_path / "ddp")
        assert not any(k.startswith("module.") for k in load_file(folder / WEIGHTS))
        assert pv.report(ddp).trainable == pv.report(model).trainable
    finally:
        dist.destroy_process_group()
