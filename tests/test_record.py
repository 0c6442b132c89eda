"""Configs are immutable values; what apply decided is a record read through peftvision.applied."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from models import make_inputs, make_model, run

import peftvision as pv

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", sorted(pv.methods()))
def test_every_config_is_frozen(name):
    cfg = pv.config(name)
    fields = dataclasses.fields(cfg)
    field = fields[0].name if fields else "anything"  # a config without options is frozen too
    with pytest.raises(dataclasses.FrozenInstanceError, match="dataclasses.replace"):
        setattr(cfg, field, getattr(cfg, field, None))
    with pytest.raises(dataclasses.FrozenInstanceError):
        delattr(cfg, field)
    assert dataclasses.replace(cfg) == cfg  # a changed copy is the way to change one
    assert copy.deepcopy(cfg) == cfg and pickle.loads(pickle.dumps(cfg)) == cfg


@pytest.mark.parametrize("arch,name,options", [
    ("vit", "lora", dict(qkv_parts="V,q")),  # validate rewrote qkv_parts to "qv"
    ("vit", "vpt", dict(mode="shallow")),  # validate filled tokens=5
    ("vit", "shpeft", dict(estimator="L1", fraction=0.05)),  # validate lower-cased the estimator
    ("resnet", "tsa", {}),
])
def test_apply_leaves_the_config_as_the_user_wrote_it(arch, name, options):
    if name == "shpeft":
        g = torch.Generator().manual_seed(0)
        options = {**options, "data": [(torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 1]))]}
    cfg = pv.config(name, **options)
    before = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    model = pv.apply(make_model(arch), cfg)
    assert {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)} == before
    assert cfg == pv.config(name, **options)
    pv.unload(model)
    assert cfg == pv.config(name, **options)


def test_lora_qkv_parts_in_any_order_adapt_the_same_slices():
    a = pv.apply(make_model("vit"), "lora", qkv_parts="V,q")
    b = pv.apply(make_model("vit"), "lora", qkv_parts="qv")
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert a.blocks[0].attn.qkv.slots == b.blocks[0].attn.qkv.slots == [0, 2]


def test_applied_records_what_apply_decided():
    model = make_model("vit")
    assert pv.applied(model) is None
    pv.apply(model, ["bias", pv.config("lora", r=2)])
    record = pv.applied(model)
    assert record.adapter_name == "default" and record.architecture == "vit" and record.train_head
    assert record.names == ("bias", "lora")
    bias, lora = record.methods
    assert bias.wrapped == () and bias.selected and all(p.endswith(".bias") for p in bias.selected)
    assert lora.selected == () and lora.wrapped == ("blocks.0.attn.qkv", "blocks.1.attn.qkv")
    assert lora.config == pv.config("lora", r=2)
    assert set(record.head) == {"head.weight", "head.bias"}
    assert record.base_model["class"].endswith(".VisionTransformer")
    with pytest.raises(KeyError, match="applied: \\['bias', 'lora'\\]"):
        record.method("ssf")
    compiled = torch.compile(model)  # seen through training wrappers, as apply does
    assert pv.applied(compiled).names == record.names
    assert pv.applied(torch.nn.DataParallel(model)).names == record.names
    pv.unload(model)
    assert pv.applied(model) is None


def test_the_record_is_read_only():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 1]))]
    model = pv.apply(make_model("vit"), "shpeft", data=data, count=20)
    record = pv.applied(model)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.train_head = False
    with pytest.raises(TypeError):
        record.base_model["class"] = "x"
    with pytest.raises(TypeError):
        record.methods[0].details["indices"] = {}
    indices = record.methods[0].details["indices"]
    assert sum(v.numel() for v in indices.values()) == 20
    for v in indices.values():
        v.fill_(0)  # a copy: the model's indices are untouched
    again = pv.applied(model).methods[0].details["indices"]
    assert all(bool((v[1:] > v[:-1]).all()) for v in again.values() if v.numel() > 1)


def test_an_adapter_saved_by_peftvision_0_1_0_still_loads(tmp_path):
    """adapter_config.json written before configs were frozen (SPT's selection and lora_modules in
    the config) loads onto a fresh base and gives the outputs it gave when saved."""
    folder = shutil.copytree(DATA / "adapter_0.1.0_bias_spt", tmp_path / "adapter")
    model = pv.load_adapter(make_model("vit", 0), folder).eval()
    expected = torch.tensor(json.loads((folder / "expected_outputs.json").read_text())["outputs"])
    with torch.no_grad():
        torch.testing.assert_close(run(model, make_inputs("vit")), expected, rtol=1e-5, atol=1e-6)
    spt = pv.applied(model).method("spt")
    assert spt.config.lora_modules == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
                                       "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    saved = json.loads((folder / "adapter_config.json").read_text())["methods"]
    # what was saved is recorded again (options added since then take their defaults)
    recorded = [{"name": m.name, "config": m.config.to_dict()} for m in pv.applied(model).methods]
    assert [m["name"] for m in recorded] == [m["name"] for m in saved]
    for now, then in zip(recorded, saved):
        assert {k: now["config"][k] for k in then["config"]} == then["config"]
