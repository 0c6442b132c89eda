"""Folders with several adapters in peft's layout ("default" at the root, the others in
subfolders named after them), both ways, against the real peft."""

from __future__ import annotations

import pytest
import torch
from models import make_inputs, make_model, run

import peftvision as pv

peft = pytest.importorskip("peft")
TOL = dict(rtol=1e-5, atol=1e-5)


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _out(model):
    model.eval()
    with torch.no_grad():
        return run(model, make_inputs("vit"))


def _peft_with(names, tmp_path):
    """A peft model with LoRA adapters `names` (different targets and ranks), saved by peft."""
    configs = [peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"]),
               peft.LoraConfig(r=2, lora_alpha=2, target_modules=["qkv", "proj"]),
               peft.LoraConfig(r=3, lora_alpha=6, use_rslora=True, target_modules=["fc2"])]
    theirs = peft.PeftModel(make_model("vit"), configs[0], adapter_name=names[0])
    for name, config in zip(names[1:], configs[1:]):
        theirs.add_adapter(name, config)
    for i, name in enumerate(names):
        theirs.set_adapter(name)  # peft trains only the active adapter's factors
        _perturb(theirs, seed=i + 1)
    theirs.save_pretrained(tmp_path)
    outputs = {}
    for name in names:
        theirs.set_adapter(name)
        outputs[name] = _out(theirs)
    return outputs


@pytest.mark.parametrize("names", [("default", "derm", "xray"), ("derm", "xray")])
def test_a_peft_multi_adapter_folder_loads_under_its_names(names, tmp_path):
    expected = _peft_with(list(names), tmp_path)
    assert all((tmp_path / n / "adapter_config.json").is_file() for n in names if n != "default")
    assert (tmp_path / "adapter_config.json").is_file() == ("default" in names)
    model = pv.load_adapter(make_model("vit"), tmp_path)
    assert pv.adapters(model) == names and pv.active_adapters(model) == names[:1]
    for name in names:
        pv.set_adapter(model, name)
        torch.testing.assert_close(_out(model), expected[name], **TOL)


def test_one_adapter_of_a_multi_adapter_folder(tmp_path):
    expected = _peft_with(["default", "derm", "xray"], tmp_path)
    model = pv.load_adapter(make_model("vit"), tmp_path, adapter_name="xray")
    assert pv.adapters(model) == ("xray",)
    torch.testing.assert_close(_out(model), expected["xray"], **TOL)
    pv.load_adapter(model, tmp_path, adapter_name="default")  # beside it
    assert pv.adapters(model) == ("xray", "default")
    with pytest.raises(pv.AdapterLoadError, match=r"holds the adapters \['default', 'derm', 'xray'\]"):
        pv.load_adapter(model, tmp_path, adapter_name="ct")
    with pytest.raises(pv.AdapterLoadError, match=r"already has adapters named \['default', 'xray'\]"):
        pv.load_adapter(model, tmp_path)
    with pytest.raises(pv.AdapterLoadError, match="name the adapter"):
        pv.load_adapter(model, tmp_path, hotswap=True)
    pv.set_adapter(model, "xray")
    _perturb(model, seed=9)
    pv.load_adapter(model, tmp_path, adapter_name="xray", hotswap=True)  # the subfolder's weights back
    torch.testing.assert_close(_out(model), expected["xray"], **TOL)
    assert pv.adapters(model) == ("xray", "default")


@pytest.mark.parametrize("fmt", ["peft", "peftvision"])
def test_saving_several_adapters_writes_peft_layout(fmt, tmp_path):
    model = make_model("vit")
    pv.apply(model, "lora", r=4, alpha=8, targets=["qkv", "fc1"])  # "default"
    pv.apply(model, "lora", adapter_name="derm", r=2, targets=["qkv", "proj"])
    for name in ("default", "derm"):
        pv.set_adapter(model, name)
        _perturb(model, seed=len(name))
    outputs = {}
    for name in ("default", "derm"):
        pv.set_adapter(model, name)
        outputs[name] = _out(model)
    pv.save_adapter(model, tmp_path, adapter_name=["derm", "default"], format=fmt)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "derm" / "adapter_config.json").is_file()
    back = pv.load_adapter(make_model("vit"), tmp_path)
    assert pv.adapters(back) == ("default", "derm")
    for name in ("default", "derm"):
        pv.set_adapter(back, name)
        torch.testing.assert_close(_out(back), outputs[name], rtol=0, atol=0)
    if fmt == "peft":  # peft reads the layout the way it writes it
        theirs = peft.PeftModel.from_pretrained(make_model("vit"), tmp_path)
        theirs.load_adapter(tmp_path / "derm", adapter_name="derm")
        for name in ("default", "derm"):
            theirs.set_adapter(name)
            torch.testing.assert_close(_out(theirs), outputs[name], **TOL)


def test_a_failing_adapter_leaves_the_model_as_it_was(tmp_path):
    _peft_with(["default", "derm"], tmp_path)
    (tmp_path / "derm" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    base = make_model("vit")
    with pytest.raises(pv.CorruptAdapterError):
        pv.load_adapter(base, tmp_path)
    assert not any(isinstance(m, pv.layers.Adapter) for m in base.modules())
    model = pv.apply(make_model("vit"), "lora", adapter_name="mine", r=2, train_head=False)  # as peft's
    with pytest.raises(pv.CorruptAdapterError):
        pv.load_adapter(model, tmp_path)
    assert pv.adapters(model) == ("mine",)


def test_bad_names(tmp_path):
    model = pv.apply(make_model("vit"), "lora", r=2)
    with pytest.raises(pv.ConfigError, match="no adapter named 'x'"):
        pv.save_adapter(model, tmp_path, adapter_name=["default", "x"])
    with pytest.raises(pv.ConfigError, match="distinct names"):
        pv.save_adapter(model, tmp_path, adapter_name=[])
    _peft_with(["default", "derm"], tmp_path / "p")
    (tmp_path / "p" / "derm").rename(tmp_path / "p" / "v1.0")
    with pytest.raises(pv.AdapterLoadError, match="'v1.0' cannot be an adapter name"):
        pv.load_adapter(make_model("vit"), tmp_path / "p")


def test_one_of_several_adapters_in_peft_format_and_hotswap_from_peft(tmp_path):
    """Regressions: format='peft' wrote the other adapters' layers too (as '...qkv.base_layer'
    keys), and hotswap refused a peft file whose config lacks peftvision's defaults."""
    model = make_model("vit")
    pv.apply(model, "lora", adapter_name="a", r=4, alpha=8, targets=["qkv", "fc1"], train_head=False)
    pv.apply(model, "lora", adapter_name="b", r=2, alpha=4, targets=["qkv", "proj"])
    pv.set_adapter(model, "b")
    _perturb(model, seed=1)
    y_b = _out(model)
    pv.save_adapter(model, tmp_path / "b", adapter_name="b", format="peft")
    theirs = peft.PeftModel.from_pretrained(make_model("vit"), tmp_path / "b")
    torch.testing.assert_close(_out(theirs), y_b, **TOL)
    fresh = make_model("vit")
    pv.apply(fresh, "lora", adapter_name="b", r=2, alpha=4, targets=["qkv", "proj"], train_head=False)
    pv.load_adapter(fresh, tmp_path / "b", adapter_name="b", hotswap=True)
    torch.testing.assert_close(_out(fresh), y_b, **TOL)


def test_a_multi_adapter_hub_repo_loads_under_its_names(monkeypatch, tmp_path):
    """The Hub download fetches the subfolders too (snapshot_download mocked: no network)."""
    import huggingface_hub

    import peftvision.hub

    expected = _peft_with(["derm", "xray"], tmp_path / "repo")  # no root adapter: subfolders only
    seen = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        seen["patterns"] = allow_patterns
        return str(tmp_path / "repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(peftvision.hub, "offline_reason", lambda timeout=3.0: None)
    model = pv.load_adapter(make_model("vit"), "me/screening")
    assert "*/adapter_config.json" in seen["patterns"]
    assert pv.adapters(model) == ("derm", "xray")
    pv.set_adapter(model, "xray")
    torch.testing.assert_close(_out(model), expected["xray"], **TOL)
