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
