"""The architecture registry, named target sets, method discovery, and the architecture quirks of
issue 11 item 6 (each test failed before its fix)."""

from __future__ import annotations

import sys

import pytest
import torch
from models import zoo_inputs, zoo_model, zoo_run
from torch import nn

import peftvision as pv
from peftvision.architectures import Architecture, architectures, register_architecture
from peftvision.layers import AdapterLayer
from peftvision.targets import detect_architecture


def outputs(model, family):
    model.eval()
    with torch.no_grad():
        return zoo_run(model, zoo_inputs(family))


def nonzero_lora(model):
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(0, 0.1)


# ---- quirks ------------------------------------------------------------------------------------

def test_deit_distilled_tuple_classifier_trains_both_heads():
    # get_classifier() returns (head, head_dist): apply crashed with "'tuple' object has no attribute"
    model = pv.apply(zoo_model("deit-distilled"), "lora", r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"} <= trainable


@pytest.mark.parametrize("family", ["eva02", "beit", "swinv2"])
@pytest.mark.parametrize("method", ["lora", "svdiff"])
def test_parent_reading_qkv_weight_gets_the_adapted_weight(family, method):
    # EVA, BEiT and Swin v2 run F.linear(x, self.qkv.weight, their own bias): a wrapped qkv
    # crashed in forward; now the parent reads W + ΔW, and the adapter is not silently ignored
    base = zoo_model(family)
    for m in base.modules():  # Swin v2 zero-inits its post-norms, which would hide any change
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
    y0 = outputs(base, family)
    model = pv.apply(base, method, targets=r"blocks\.0\.attn\.qkv|layers\.0\.blocks\.0\.attn\.qkv")
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if p.requires_grad and ("lora_B" in n or "svd_delta" in n)):
            p.normal_(0, 0.1)
    y1 = outputs(model, family)
    assert not torch.allclose(y0, y1)  # the adapter acts
    pv.merge(model)
    assert torch.allclose(outputs(model, family), y1, atol=1e-5)  # and acts exactly as its merge


def test_adapter_the_parent_cannot_see_is_refused_not_ignored():
    # SSF's output affine cannot be expressed as a weight: EVA would silently skip it
    model = zoo_model("eva02")
    with pytest.raises(pv.UnsupportedArchitectureError, match=r"qkv\.weight"):
        pv.apply(model, "ssf", targets=[r"blocks.0.attn.qkv"])
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_maxvit_rel_pos_called_by_parent_is_refused_with_a_clear_error():
    # MaxViT's attention calls self.rel_pos.get_bias(): a wrapped rel_pos crashed in forward
    model = zoo_model("maxvit")
    name = "stages.0.blocks.0.attn_block.attn.rel_pos"
    data = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))]
    with pytest.raises(pv.ConfigError, match="no trainable tensor"):  # out of a sparse scope
        pv.apply(model, "shpeft", data=data, scope=[name])
    model = pv.apply(model, "shpeft", data=data, fraction=0.05)  # the whole backbone: rel_pos skipped
    assert outputs(model, "maxvit").isfinite().all()
    assert not isinstance(model.get_submodule("stages.0.blocks.0.attn_block.attn").rel_pos, AdapterLayer)


def test_integer_weights_are_a_peftvision_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(pv.UnsupportedArchitectureError, match="int8"):
        pv.apply(model, "lora", targets=["0"])
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_ssf_after_a_norm_with_activation_merges_exactly():
    # timm's BatchNormAct2d applies its activation inside: SSF after it merged into the BN weights
    # gave outputs off by up to 0.09; now SSF sits between norm and activation
    model = pv.apply(zoo_model("efficientnet"), "ssf", targets=[nn.BatchNorm2d], init_std=0.1)
    y = outputs(model, "efficientnet")
    pv.merge(model)
    assert torch.allclose(outputs(model, "efficientnet"), y, atol=1e-5)


# ---- registry ----------------------------------------------------------------------------------

def test_every_method_runs_without_targets_where_the_registry_says():
    info = pv.methods()
    for name in ("lora", "ssf", "adaptformer", "ia3", "vpt"):
        assert "swin" in info[name].architectures
    assert "convnext" in info["ssf"].architectures and "sam-vit" not in info["vpt"].architectures


def test_third_party_architecture_registration():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.enc(x))

    assert detect_architecture(Toy()) == "generic"
    with pytest.raises(pv.UnsupportedArchitectureError, match="enc.0, enc.2, out"):
        pv.apply(Toy(), "lora")  # the error lists real module names
    register_architecture(Architecture(
        "toy-test", recognise=lambda m: isinstance(m, Toy), placements={"lora": r"enc\.\d+"}))
    try:
        model = pv.apply(Toy(), "lora", r=2)
        assert detect_architecture(model) == "toy-test"
        assert {n for n, m in model.named_modules() if isinstance(m, AdapterLayer)} == {"enc.0", "enc.2"}
    finally:
        from peftvision import architectures as registry

        registry._ARCHITECTURES.pop("toy-test")
    assert "toy-test" not in architectures()


def test_named_target_sets_skip_the_head():
    model = zoo_model("convnext")
    pv.apply(model, "lora", r=2, targets="all-conv")
    wrapped = {n for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    convs = {n for n, m in zoo_model("convnext").named_modules() if isinstance(m, nn.Conv2d)}
    assert wrapped == convs
    vit = pv.apply(zoo_model("vit"), "lora", r=2, targets="all-linear")
    wrapped = {n for n, m in vit.named_modules() if isinstance(m, AdapterLayer)}
    assert "head" not in wrapped and "blocks.0.mlp.fc2" in wrapped


def test_methods_are_discovered_and_entry_points_load(monkeypatch):
    loaded = []

    class EntryPoint:
        name, value = "toy", "toy_plugin:Method"

        def load(self):
            loaded.append(self.name)

    class Broken(EntryPoint):
        name = "broken"

        def load(self):
            raise ImportError("no module named toy_plugin")

    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [EntryPoint(), Broken()] if group == "peftvision.methods" else [])
    methods_pkg = sys.modules["peftvision.methods"]
    with pytest.warns(UserWarning, match="broken"):
        methods_pkg.load_entry_points()
    assert loaded == ["toy"]
    assert "ia3" in pv.methods()  # a file in peftvision/methods/, no import list


@pytest.mark.parametrize("first", ["import peftvision.methods as m", "import peftvision as pv"])
def test_methods_is_the_subpackage_and_lists_the_methods(first):
    """`peftvision.methods` named both a function and the subpackage: `import peftvision.methods
    as m` gave the function (no `m.Method`, no `m.lora`), whichever was imported first."""
    import subprocess

    code = (f"{first}\nimport peftvision as pv\nimport peftvision.methods as m\n"
            "from peftvision.methods import lora\n"
            "assert m is pv.methods and m.Method is lora.Method\n"
            "assert 'lora' in pv.methods() and pv.methods()['lora'].kind == 'additive'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
