"""peft adapters both ways against the real peft: LoRA (DoRA, rsLoRA, PiSSA), LoHa, LoKr, IA3, OFT.

Every adapter is moved away from its initialisation first (random noise on all trained tensors),
so equal outputs mean equal functions, not two identities.
"""

import pytest
import torch
from models import make_inputs, make_model, run

import peftvision as pv

peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-5)
BLOCK_1X1 = r"layer\d\.\d\.conv[13]"  # the 1x1 convs of the tiny ResNet's bottlenecks


def _perturb(model, seed=3):
    """Noise on every trained tensor (adapters and head): a non-identity adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _outputs(model, arch):
    model.eval()
    with torch.no_grad():
        return run(model, make_inputs(arch))


PEFT_MADE = {  # id: (arch, peft config)
    "lora-rslora-vit": ("vit", lambda: peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True,
                                                       target_modules=["qkv", "fc1"], modules_to_save=["head"])),
    "dora-vit": ("vit", lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["qkv", "proj"])),
    "dora-resnet": ("resnet", lambda: peft.LoraConfig(r=2, use_dora=True, target_modules=["conv2", "conv3"],
                                                      modules_to_save=["fc"])),
    "loha-vit": ("vit", lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["qkv", "fc2"])),
    "loha-resnet": ("resnet", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["conv2", "conv3"])),
    "lokr-vit": ("vit", lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["qkv", "fc1"])),
    "lokr-vit-both-factor": ("vit", lambda: peft.LoKrConfig(r=1, alpha=2, decompose_both=True,
                                                            decompose_factor=4, target_modules=["qkv", "fc2"])),
    "lokr-resnet": ("resnet", lambda: peft.LoKrConfig(r=2, target_modules=["conv2", "conv3"])),
    "ia3-vit": ("vit", lambda: peft.IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"])),
    "ia3-resnet": ("resnet", lambda: peft.IA3Config(target_modules=["conv2", "conv3"],
                                                    feedforward_modules=["conv3"])),
    "oft-vit": ("vit", lambda: peft.OFTConfig(oft_block_size=8, use_cayley_neumann=False,
                                              target_modules=["qkv", "fc1"], modules_to_save=["head"])),
    "oft-resnet": ("resnet", lambda: peft.OFTConfig(oft_block_size=4, use_cayley_neumann=False,
                                                    target_modules=BLOCK_1X1)),
}


@pytest.mark.parametrize("case", sorted(PEFT_MADE))
def test_a_peft_adapter_loads_with_peft_outputs(case, tmp_path):
    arch, config = PEFT_MADE[case]
    theirs = peft.get_peft_model(make_model(arch), config())
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = pv.load_adapter(make_model(arch), tmp_path)
    torch.testing.assert_close(_outputs(ours, arch), _outputs(theirs, arch), **TOL)
    assert pv.report(ours).trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


OURS = {  # id: (arch, method config)
    "lora-rslora-vit": ("vit", pv.config("lora", r=4, alpha=16, use_rslora=True, targets=["qkv", "fc1"])),
    "lora-pissa-vit": ("vit", pv.config("lora", r=2, alpha=4, init="pissa", targets=["qkv", "fc2"])),
    "lora-olora-rslora-resnet": ("resnet", pv.config("lora", r=2, init="olora", use_rslora=True)),
    "dora-vit": ("vit", pv.config("dora", r=4, alpha=8, targets=["qkv", "fc1"])),
    "dora-resnet": ("resnet", pv.config("dora", r=2)),
    "loha-vit": ("vit", pv.config("loha", r=4, alpha=8)),
    "loha-resnet": ("resnet", pv.config("loha", r=2)),
    "lokr-vit": ("vit", pv.config("lokr", r=2, alpha=4, targets=["qkv", "fc2"])),
    "lokr-vit-both-factor": ("vit", pv.config("lokr", r=1, factor=4, decompose_both=True, targets=["qkv", "fc2"])),
    "lokr-resnet": ("resnet", pv.config("lokr", r=2)),
    "ia3-vit": ("vit", pv.config("ia3")),  # k, v thirds of the fused qkv and the fc2 inputs
    "ia3-resnet": ("resnet", pv.config("ia3")),
    "oft-vit": ("vit", pv.config("oft", block_size=8, targets=["qkv", "fc1", "fc2"])),
    "oft-resnet": ("resnet", pv.config("oft", block_size=4, targets=BLOCK_1X1)),
}


@pytest.mark.parametrize("case", sorted(OURS))
def test_peft_loads_our_adapter_with_our_outputs(case, tmp_path):
    arch, method = OURS[case]
    ours = pv.apply(make_model(arch), method)
    _perturb(ours)
    pv.save_adapter(ours, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(make_model(arch), tmp_path)
    torch.testing.assert_close(_outputs(theirs, arch), _outputs(ours, arch), **TOL)
    # and back: the peft folder loads onto a fresh base with the same outputs
    again = pv.load_adapter(make_model(arch), tmp_path)
    torch.testing.assert_close(_outputs(again, arch), _outputs(ours, arch), **TOL)


def _unchanged(model) -> bool:
    return not any(isinstance(m, pv.layers.Adapter) for m in model.modules())


@pytest.mark.parametrize("config, match", [
    (lambda: peft.OFTConfig(oft_block_size=8, target_modules=["qkv"]), "Cayley-Neumann"),
    (lambda: peft.OFTConfig(oft_block_size=8, use_cayley_neumann=False, coft=True, target_modules=["qkv"]),
     "coft"),
    (lambda: peft.OFTConfig(oft_block_size=8, use_cayley_neumann=False, block_share=True,
                            target_modules=["qkv"]), "block_share"),
    (lambda: peft.LoraConfig(r=4, target_modules=["qkv", "fc1"], rank_pattern={"fc1": 2}), "rank_pattern"),
    (lambda: peft.LoraConfig(r=4, target_modules=["qkv"], lora_bias=True), "lora_bias"),
    (lambda: peft.LoraConfig(r=4, target_modules=["qkv"], bias="all"), "bias"),
    (lambda: peft.LoHaConfig(r=4, target_modules=["qkv", "fc1"], alpha_pattern={"fc1": 2}), "alpha_pattern"),
])
def test_peft_options_we_cannot_reproduce_are_refused(config, match, tmp_path):
    theirs = peft.get_peft_model(make_model("vit"), config())
    theirs.save_pretrained(tmp_path)
    base = make_model("vit")
    with pytest.raises(pv.AdapterLoadError, match=match):
        pv.load_adapter(base, tmp_path)
    assert _unchanged(base)


def test_peft_oft_on_a_3x3_conv_is_refused_both_ways(tmp_path):
    # peft rotates overlapping input patches of a k×k conv and folds them back: not W0·Rᵀ
    theirs = peft.get_peft_model(make_model("resnet"), peft.OFTConfig(
        oft_block_size=4, use_cayley_neumann=False, target_modules=["conv2"]))
    theirs.save_pretrained(tmp_path / "theirs")
    base = make_model("resnet")
    with pytest.raises(pv.AdapterLoadError, match=r"3x3 conv.*F\.fold"):
        pv.load_adapter(base, tmp_path / "theirs")
    assert _unchanged(base)
    ours = pv.apply(make_model("resnet"), "oft", block_size=4, targets=["conv2"])
    with pytest.raises(pv.ConfigError, match=r"3x3 conv.*F\.fold"):
        pv.save_adapter(ours, tmp_path / "ours", format="peft")
    assert not (tmp_path / "ours").exists()


def test_peft_tucker_core_convs_are_refused(tmp_path):
    theirs = peft.get_peft_model(make_model("resnet"), peft.LoHaConfig(
        r=2, use_effective_conv2d=True, target_modules=["conv2"]))
    theirs.save_pretrained(tmp_path)
    base = make_model("resnet")
    with pytest.raises(pv.AdapterLoadError, match="use_effective_conv2d"):
        pv.load_adapter(base, tmp_path)
    assert _unchanged(base)


def test_training_only_dropout_is_reported_not_silently_dropped(tmp_path):
    theirs = peft.get_peft_model(make_model("vit"), peft.LoKrConfig(r=2, rank_dropout=0.1, target_modules=["qkv"]))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="rank_dropout"):
        ours = pv.load_adapter(make_model("vit"), tmp_path)
    torch.testing.assert_close(_outputs(ours, "vit"), _outputs(theirs, "vit"), **TOL)


def test_oft_block_sizes_peft_cannot_derive_are_refused_on_save(tmp_path):
    # block_size=8: ours takes 8 for 8 inputs and 5 for 10 (the largest divisor up to 8); peft's
    # one oft_block_size gives 10 for 10 inputs when it is 8, and 4 for 8 inputs when it is 5
    model = torch.nn.Sequential(torch.nn.Linear(8, 10), torch.nn.ReLU(), torch.nn.Linear(10, 4))
    ours = pv.apply(model, "oft", block_size=8, targets=["0", "2"])
    with pytest.raises(pv.ConfigError, match=r"block sizes \[5, 8\]"):
        pv.save_adapter(ours, tmp_path, format="peft")


def test_lokr_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as theirs

    from peftvision.methods.lokr import factorization as ours

    for n in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            assert ours(n, factor) == theirs(n, factor), (n, factor)


def test_oft_block_size_rule_is_peft_s():
    from peft.tuners.oft.layer import OFTLayer

    from peftvision.interop.peft_oft import peft_block_size

    for n in range(2, 300):
        for wanted in (2, 3, 4, 5, 7, 8, 12, 16, 32, 64):
            assert peft_block_size(n, wanted) == OFTLayer.adjust_oft_parameters(None, n, wanted), (n, wanted)
