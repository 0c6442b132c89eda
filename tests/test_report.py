import pytest
from models import make_model
from torch import nn

import peftvision as pv


def test_report_counts_per_method_and_module_type():
    model = pv.apply(make_model("vit"), [pv.config("lora", r=2), "layernorm"])
    rep = pv.report(model)
    d = rep.to_dict()
    assert d["total"] == sum(p.numel() for p in model.parameters())
    assert d["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert d["percent"] == pytest.approx(100 * d["trainable"] / d["total"])
    lora = sum(2 * (32 + 96) for _ in model.blocks)  # r=2: A (2, 32) + B (96, 2) per block
    norms = sum(p.numel() for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert rep.by_method == {"lora": lora, "layernorm": norms, "head": head}
    assert rep.by_module_type["LoRALinear"] == lora
    assert rep.by_module_type["LayerNorm"] == norms
    assert rep.methods == ["lora", "layernorm"]
    text = str(rep)
    assert "trainable parameters" in text and "lora" in text and "LoRALinear" in text


def test_report_on_plain_model():
    model = make_model("resnet")
    rep = pv.report(model)
    assert rep.trainable == rep.total == sum(p.numel() for p in model.parameters())
    assert rep.methods == []


def test_parameter_selected_by_two_methods_counts_once():
    model = pv.apply(make_model("vit"), ["bias", "layernorm"])
    rep = pv.report(model)
    assert rep.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(rep.by_method.values()) == rep.trainable


def _lora_count(model, r):  # LoRA on each block's qkv of the tiny ViT: A (r, 32) + B (96, r)
    return sum(r * (32 + 96) for _ in model.blocks)


def test_report_shows_each_adapter_when_there_are_several():
    model = pv.apply(make_model("vit"), "lora", adapter_name="a", r=2)
    single = pv.report(model)
    assert single.adapters == [] and "adapters" not in single.to_dict()  # one adapter: as before
    assert "adapter " not in str(single)
    pv.apply(model, [pv.config("lora", r=4), "layernorm"], adapter_name="b")
    head = sum(p.numel() for p in model.head.parameters())
    norms = sum(p.numel() for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters())
    pv.set_scale(model, "a", 0.5)
    rep = pv.report(model)
    assert [(a.name, a.methods, a.active, a.scale) for a in rep.adapters] == [
        ("a", ["lora"], True, 0.5), ("b", ["lora", "layernorm"], False, 1.0)]
    assert rep.adapters[0].trainable == _lora_count(model, 2) + head == rep.trainable
    assert rep.adapters[1].trainable == _lora_count(model, 4) + norms + head
    assert rep.methods == ["lora"] and rep.by_method == {"lora": _lora_count(model, 2), "head": head}
    text = str(rep)
    assert "lora + layernorm" in text and "yes" in text and "0.5" in text
    assert rep.to_dict()["adapters"][1]["name"] == "b"


def test_report_with_several_or_no_active_adapters():
    """Regression: report raised NotAppliedError ("several adapters are active") here."""
    model = pv.apply(make_model("vit"), "lora", adapter_name="a", r=2)
    pv.apply(model, "lora", adapter_name="b", r=4)
    pv.set_adapter(model, ["a", "b"])
    rep = pv.report(model)
    assert rep.methods == ["lora"] and [a.active for a in rep.adapters] == [True, True]
    assert rep.by_method["lora"] == _lora_count(model, 2) + _lora_count(model, 4)
    with pv.disable_adapters(model):
        rep = pv.report(model)
    assert [a.active for a in rep.adapters] == [False, False]
    assert rep.adapters[1].trainable == _lora_count(model, 4) + sum(p.numel() for p in model.head.parameters())
