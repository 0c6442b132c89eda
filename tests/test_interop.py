"""LoRA adapters cross over to Hugging Face peft and diffusers, and back."""

import pytest
import torch
from models import make_inputs, make_model, run

import peftvision as pv

peft = pytest.importorskip("peft")


def _randomize_lora(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter do something
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _outputs(model, arch="vit"):
    model.eval()
    with torch.no_grad():
        return run(model, make_inputs(arch))


def test_peft_loads_our_vit_lora_with_the_same_outputs(tmp_path):
    model = pv.apply(make_model("vit"), "lora", r=4, alpha=8)
    _randomize_lora(model)
    with torch.no_grad():
        model.head.weight.mul_(1.5)  # the trained head travels as peft's modules_to_save
    pv.save_adapter(model, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(make_model("vit"), tmp_path)
    torch.testing.assert_close(_outputs(theirs), _outputs(model), rtol=1e-5, atol=1e-6)


def test_we_load_a_peft_lora_with_the_same_outputs(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["qkv"], modules_to_save=["head"],
                             init_lora_weights=False)  # random B: a non-identity adapter
    theirs = peft.get_peft_model(make_model("vit"), config)
    theirs.save_pretrained(tmp_path)
    ours = pv.load_adapter(make_model("vit"), tmp_path)
    assert pv.report(ours).by_method["lora"] == 2 * 4 * (32 + 96)
    torch.testing.assert_close(_outputs(ours), _outputs(theirs), rtol=1e-5, atol=1e-6)


def test_diffusers_loads_our_unet_lora(tmp_path):
    model = pv.apply(make_model("unet"), "lora", r=4)
    _randomize_lora(model)
    pv.save_adapter(model, tmp_path, format="peft")
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    unet = make_model("unet")
    unet.load_lora_adapter(tmp_path, prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(_outputs(unet, "unet"), _outputs(model, "unet"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["ssf", pv.config("lora", qkv_parts="qv"), ["lora", "bias"]])
def test_peft_format_refuses_what_peft_cannot_hold(method, tmp_path):
    model = pv.apply(make_model("vit"), method)
    with pytest.raises(pv.ConfigError, match="format='peft'"):
        pv.save_adapter(model, tmp_path, format="peft")
