"""set_scale (issue 13): per method kind, scale 0 is the base output bit for bit, 1 the adapter
as trained, and s the weight change scaled by s (W + s·(W' - W)), in the forward and in merge."""

from __future__ import annotations

import pytest
import torch
from models import make_inputs, make_model, run
from torch import nn

import peftvision as pv
from peftvision.checkpoint import adapter_tensors
from peftvision.errors import ConfigError, MergeError
from peftvision.layers import AdapterLayer
from peftvision.scale import get_scale

CASES = {  # id: (arch, method, options)
    "lora-vit": ("vit", "lora", dict(r=4, alpha=8)),
    "rslora-qkv-slices": ("vit", "lora", dict(r=4, use_rslora=True, qkv_parts="qv")),
    "pissa": ("vit", "lora", dict(r=2, init="pissa", targets=["fc1"])),
    "lora-resnet": ("resnet", "lora", dict(r=2)),
    "dora-vit": ("vit", "dora", dict(r=2)),
    "dora-resnet": ("resnet", "dora", dict(r=2)),
    "loha": ("vit", "loha", dict(r=2)),
    "lokr": ("resnet", "lokr", dict(r=2)),
    "ia3-vit": ("vit", "ia3", {}),
    "ia3-resnet": ("resnet", "ia3", {}),
}


def _out(model, arch):
    model.eval()
    with torch.no_grad():
        return run(model, make_inputs(arch))


def _perturb(model, name="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapter_tensors(model, name).values():
            if isinstance(t, nn.Parameter):
                t.add_(torch.randn(t.shape, generator=g) * 0.1)


def _weights(model):
    """The base layers' weights and biases (what merge rewrites), by module."""
    return {name.replace(".base_layer", ""): (m.weight.detach().clone(),
                                              None if m.bias is None else m.bias.detach().clone())
            for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, AdapterLayer)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_scale_zero_is_base_one_is_trained_and_merge_scales_the_weight_change(case):
    arch, method, options = CASES[case]
    model = make_model(arch)
    y0 = _out(model, arch)
    w0 = _weights(model)
    pv.apply(model, method, train_head=False, **options)
    _perturb(model)
    y1 = _out(model, arch)
    assert (y1 - y0).abs().max() > 1e-3
    pv.set_scale(model, "default", 0.0)
    assert torch.equal(_out(model, arch), y0)
    pv.set_scale(model, "default", 1)
    assert torch.equal(_out(model, arch), y1)
    pv.merge(model)  # (unmerge gives the weights back within rounding: bitwise checks come first)
    w1 = _weights(model)
    pv.unmerge(model)

    pv.set_scale(model, "default", 0.5)
    assert get_scale(model, "default") == 0.5
    y_half = _out(model, arch)
    pv.merge(model)
    torch.testing.assert_close(_out(model, arch), y_half, rtol=1e-5, atol=1e-5)
    for name, (w, b) in _weights(model).items():  # W + 0.5·(W' - W), the same for biases
        torch.testing.assert_close(w, w0[name][0] + 0.5 * (w1[name][0] - w0[name][0]), rtol=1e-5, atol=1e-6)
        if b is not None:
            torch.testing.assert_close(b, w0[name][1] + 0.5 * (w1[name][1] - w0[name][1]), rtol=1e-5, atol=1e-6)
    with pytest.raises(MergeError, match="unmerge"):
        pv.set_scale(model, "default", 1.0)
    pv.unmerge(model)
    pv.set_scale(model, "default", 1.0)
    torch.testing.assert_close(_out(model, arch), y1, rtol=1e-6, atol=1e-6)


def test_scale_is_per_adapter_and_mixing_sees_it():
    model = make_model("vit")
    pv.apply(model, "lora", adapter_name="a", r=2, train_head=False)
    pv.apply(model, "lora", adapter_name="b", r=2)
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    pv.set_adapter(model, "b")
    y_b = _out(model, "vit")
    pv.set_scale(model, "a", 0.0)
    assert torch.equal(_out(model, "vit"), y_b)  # b untouched
    pv.set_scale(model, "a", 0.25)
    pv.set_adapter(model, "a")
    y_quarter = _out(model, "vit")
    # like peft, a mix takes each source's effect at its current scale
    pv.add_weighted_adapter(model, ["a"], [1.0], adapter_name="mix", combination_type="cat")
    pv.set_adapter(model, "mix")
    torch.testing.assert_close(_out(model, "vit"), y_quarter, rtol=1e-5, atol=1e-6)


def test_hotswap_keeps_the_scale(tmp_path):
    model = make_model("vit")
    pv.apply(model, "lora", adapter_name="a", r=2, train_head=False)
    _perturb(model, "a", 1)
    pv.save_adapter(model, tmp_path / "a", adapter_name="a")
    pv.set_scale(model, "a", 0.0)
    pv.load_adapter(model, tmp_path / "a", adapter_name="a", hotswap=True)
    assert get_scale(model, "a") == 0.0
    assert torch.equal(_out(model, "vit"), _out(make_model("vit"), "vit"))


@pytest.mark.parametrize("method,options,match", [
    ("ssf", {}, r"\['ssf'\], which have no output scale"),
    ("vpt", dict(tokens=2), r"\['vpt'\], which have no output scale"),
    ("bias", {}, r"\['bias'\], which train the model's own parameters"),
])
def test_undefined_kinds_are_refused(method, options, match):
    model = pv.apply(make_model("vit"), method, **options)
    with pytest.raises(ConfigError, match=match):
        pv.set_scale(model, "default", 0.5)


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), "0.5", True, None])
def test_bad_scales_and_names(scale):
    model = pv.apply(make_model("vit"), "lora", r=2)
    with pytest.raises(ConfigError, match="finite number"):
        pv.set_scale(model, "default", scale)
    with pytest.raises(ConfigError, match="no adapter named 'x'"):
        pv.set_scale(model, "x", 0.5)
