"""QLoRA: LoRA on bitsandbytes Linear8bitLt / Linear4bit layers (peftvision/quant.py), and clear
errors for integer / quantized weights wherever a method cannot run on them.

The bitsandbytes tests run on the CPU (bitsandbytes >= 0.45 has CPU kernels) and skip without it."""

from __future__ import annotations

import copy

import pytest
import torch
from models import make_inputs, tiny_vit
from torch import nn

import peftvision as pv
from peftvision import quant
from peftvision.layers import AdapterLayer

LINEARS = ("qkv", "proj", "fc1", "fc2")  # every Linear of the tiny ViT's blocks
BITS = [8, 4]


class FakeInt8Linear(nn.Linear):
    """An int8 weight with a per-row scale: a quantized Linear peftvision does not know."""

    def __init__(self) -> None:
        super().__init__(8, 4, bias=False)
        self.weight = nn.Parameter(torch.ones(4, 8, dtype=torch.int8), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return nn.functional.linear(x, self.weight.float() * self.scale[:, None])


def _fake_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), FakeInt8Linear())


@pytest.mark.parametrize("method", ["lora", "loha", "oft", "ia3", "dora", "svdiff"])
def test_unknown_quantized_layer_is_a_clear_error_for_wrapping_methods(method):
    model = _fake_model()
    with pytest.raises(pv.UnsupportedArchitectureError, match=r"1 holds FakeInt8Linear \(torch.int8"):
        pv.apply(model, method, targets=["1"])
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_selecting_an_integer_weight_is_a_clear_error_not_a_torch_error():
    # requires_grad_(True) on an int8 tensor raised torch's RuntimeError before
    model = _fake_model()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(pv.UnsupportedArchitectureError, match=r"1\.weight is torch\.int8, which cannot train"):
        pv.apply(model, "full")
    assert [p.requires_grad for p in model.parameters()] == flags  # rolled back: as it was
    assert pv.applied(model) is None


def test_the_error_names_bitsandbytes_when_it_is_missing(monkeypatch):
    monkeypatch.setattr(quant, "bnb_installed", lambda: False)
    with pytest.raises(pv.UnsupportedArchitectureError, match=r"bitsandbytes.*not installed.*peftvision\[quant\]"):
        pv.apply(_fake_model(), "lora", targets=["1"])


# -- bitsandbytes layers ----------------------------------------------------------------------


def _float_vit() -> nn.Module:
    # width 64: bitsandbytes' CPU 4-bit quantization needs in_features divisible by 64 (quant.py)
    torch.manual_seed(0)
    return tiny_vit(embed_dim=64).eval()


def _qvit(bits: int) -> nn.Module:
    pytest.importorskip("bitsandbytes")
    return quant.quantize(_float_vit(), bits)


def _out(model: nn.Module, train: bool = False) -> torch.Tensor:
    """Outputs without gradients; train=True runs bitsandbytes' float-activation path (the tiny
    ViT has no dropout), where eval mode rounds activations to int8 at 8 bits (LLM.int8())."""
    model.train(train)
    with torch.no_grad():
        return model(*make_inputs("vit"))


def _perturb(model: nn.Module, seed: int = 3) -> None:
    """Noise on every trained tensor: a non-identity adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("bits", BITS)
def test_quantize_replaces_block_linears_and_keeps_the_head_float(bits):
    model = _qvit(bits)
    kind = {8: "Linear8bitLt", 4: "Linear4bit"}[bits]
    names = [n for n, m in model.named_modules() if n.startswith("blocks.") and n.rpartition(".")[2] in LINEARS]
    assert names and all(quant.bnb_kind(model.get_submodule(n)) == kind for n in names)
    assert type(model.head) is nn.Linear
    assert all(not model.get_submodule(n).weight.is_floating_point() for n in names)
    # the quantized layer computes with its dequantized weight (what merge-after-dequantize uses)
    layer = model.blocks[0].mlp.fc1.train()  # float activations (see _out)
    x = torch.randn(3, layer.in_features)
    expected = nn.functional.linear(x, quant.dequantized_weight(layer), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    # and that weight is the float one up to the rounding: an int8 step of the row's absmax at 8
    # bits; at 4 bits half NF4's widest gap (1 - 0.7230 = 0.277) of a 64-weight block's absmax,
    # bounded by the tensor's absmax (+ the absmax's own 8-bit rounding: compress_statistics)
    float_w = _float_vit().blocks[0].mlp.fc1.weight.detach()
    bound = float_w.abs().amax(1, keepdim=True) / 127 if bits == 8 else float_w.abs().max() * 0.15
    assert ((quant.dequantized_weight(layer) - float_w).abs() <= bound).all()


def test_quantize_refuses_cpu_4bit_layers_bitsandbytes_gets_wrong():
    # bitsandbytes 0.50.2 on the CPU: in_features 32 gave 40% relative weight error (NF4: 9%)
    pytest.importorskip("bitsandbytes")
    model = tiny_vit()  # embed_dim 32
    with pytest.raises(ValueError, match=r"multiple of 64.*blocks\.0\.attn\.qkv"):
        quant.quantize(model, 4)
    assert type(model.blocks[0].attn.qkv) is nn.Linear  # nothing changed
    quant.quantize(model, 8)  # int8 rows have no blocks


def test_quantized_outputs_do_not_change_after_state_dict():
    # bitsandbytes' CPU bf16 repacking (on by default there) made every state_dict() call change
    # the next outputs of a 4-bit model; quantize turns it off
    model = _qvit(4)
    first = _out(model)
    model.state_dict()
    torch.testing.assert_close(_out(model), first, rtol=0, atol=0)


@pytest.mark.parametrize("bits", BITS)
def test_qlora_starts_at_the_quantized_model_and_trains_only_lora(bits):
    model = _qvit(bits)
    base, before = _out(model), _state(model)
    pv.apply(model, "lora", r=4, targets=list(LINEARS))
    torch.testing.assert_close(_out(model), base, rtol=0, atol=0)  # B = 0: exactly the base output
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora) | {"head.weight", "head.bias"}

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # B moves on the first step, A from the second
        opt.zero_grad()
        model(*make_inputs("vit")).logsumexp(-1).sum().backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    model.eval()
    assert not torch.allclose(_out(model), base)
    after = {k: v for k, v in model.state_dict().items() if "lora_" not in k and not k.startswith("head.")}
    after = {k.replace(".base_layer", ""): v for k, v in after.items()}
    for key, value in after.items():  # the quantized base did not move
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("bits", BITS)
def test_qlora_report_and_fingerprint_count_the_weights_a_packed_tensor_stands_for(bits):
    from peftvision.identity import fingerprint

    model, plain = _qvit(bits), _float_vit()
    assert fingerprint(model) == fingerprint(plain)  # an adapter moves between the two freely
    pv.apply(model, "lora", r=4)
    pv.apply(plain, "lora", r=4)
    assert pv.report(model).total == pv.report(plain).total
    assert pv.report(model).trainable == pv.report(plain).trainable


@pytest.mark.parametrize("bits", BITS)
def test_qlora_save_load_and_unload_are_exact(bits, tmp_path):
    model = _qvit(bits)
    before = _state(model)
    pv.apply(model, "lora", r=4, targets=list(LINEARS))
    _perturb(model)
    adapted = _out(model)
    pv.save_adapter(model, tmp_path / "a")

    fresh = pv.load_adapter(_qvit(bits), tmp_path / "a")
    torch.testing.assert_close(_out(fresh), adapted, rtol=0, atol=0)

    pv.unload(model)
    after = _state(model)
    head = {"head.weight", "head.bias"}  # the head trained (perturbed); unload keeps it
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in set(before) - head)


@pytest.mark.parametrize("bits", BITS)
def test_merging_into_a_quantized_layer_is_refused_and_dequantize_makes_it_possible(bits):
    model = _qvit(bits)
    pv.apply(model, "lora", r=4, targets=["blocks.0.mlp.fc1", "blocks.1.attn.qkv"])
    _perturb(model)
    adapted = _out(model, train=True)
    with pytest.raises(pv.MergeError, match=r"bitsandbytes Linear(8bitLt|4bit).*re-quantized.*dequantize"):
        pv.merge(model)
    torch.testing.assert_close(_out(model, train=True), adapted, rtol=0, atol=0)  # nothing changed

    quant.dequantize(model)  # float layers with the quantized values: the same function
    assert not any(quant.bnb_kind(m) for m in model.modules())
    dequantized = _out(model, train=True)
    torch.testing.assert_close(dequantized, adapted, rtol=1e-5, atol=1e-5)
    pv.merge(model)
    torch.testing.assert_close(_out(model), dequantized, rtol=1e-5, atol=1e-5)
    plain = pv.unload(model, merge=True)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(_out(plain), dequantized, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [dict(use_dora=True), dict(init="pissa")], ids=["dora", "pissa"])
def test_lora_variants_that_read_the_float_weight_are_refused_on_bitsandbytes(options):
    model = _qvit(4)
    with pytest.raises(pv.UnsupportedArchitectureError, match=r"bitsandbytes Linear4bit.*only 'lora'"):
        pv.apply(model, "lora", r=4, **options)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


@pytest.mark.parametrize("method", ["ssf", "loha", "full"])
def test_other_methods_on_bitsandbytes_layers_are_clear_errors(method):
    model = _qvit(8)
    with pytest.raises(pv.UnsupportedArchitectureError, match=r"bitsandbytes Linear8bitLt"):
        pv.apply(model, method)


def test_selective_methods_that_skip_the_quantized_weights_still_run():
    model = _qvit(4)
    base = _out(model)
    pv.apply(model, [pv.config("lora", r=4), "bias", "layernorm"])
    torch.testing.assert_close(_out(model), base, rtol=0, atol=0)
    assert pv.report(model).by_method["bias"] > 0


@pytest.mark.parametrize("bits", BITS)
def test_qlora_gives_peft_outputs_on_the_same_bitsandbytes_model(bits, tmp_path):
    peft = pytest.importorskip("peft")
    model = _qvit(bits)
    theirs = copy.deepcopy(model)
    setattr(theirs, f"is_loaded_in_{bits}bit", True)  # what makes peft pick its bnb LoRA layers
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(LINEARS), init_lora_weights=False)
    theirs = peft.get_peft_model(theirs, config)
    kind = {8: "Linear8bitLt", 4: "Linear4bit"}[bits]
    assert type(theirs.base_model.model.blocks[0].attn.qkv).__name__ == kind  # peft's bnb layer
    theirs.eval()
    expected = _out(theirs)
    theirs.save_pretrained(tmp_path / "peft")

    mine = pv.load_adapter(model, tmp_path / "peft")
    assert isinstance(mine.blocks[0].attn.qkv, AdapterLayer)
    torch.testing.assert_close(_out(mine), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_a_qlora_adapter_saved_for_peft_gives_our_outputs_in_peft(bits, tmp_path):
    peft = pytest.importorskip("peft")
    model = _qvit(bits)
    theirs = copy.deepcopy(model)
    pv.apply(model, "lora", r=4, alpha=8, targets=["qkv", "fc1"])
    _perturb(model)
    mine = _out(model)
    pv.save_adapter(model, tmp_path / "a", format="peft")
    setattr(theirs, f"is_loaded_in_{bits}bit", True)
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "a")
    kind = quant.bnb_kind(model.blocks[0].mlp.fc1.base_layer)
    assert type(theirs.base_model.model.blocks[0].mlp.fc1).__name__ == kind  # peft's bnb LoRA layer
    torch.testing.assert_close(_out(theirs), mine, rtol=1e-5, atol=1e-6)


def test_disabled_qlora_adapters_give_the_quantized_model():
    model = _qvit(4)
    base = _out(model)
    pv.apply(model, "lora", r=4)
    _perturb(model)
    with pv.disable_adapters(model):
        torch.testing.assert_close(_out(model), base, rtol=0, atol=0)


def test_a_parent_that_computes_with_a_quantized_weight_is_refused_and_quantize_skips_it():
    # timm's EVA attention runs F.linear(x, self.qkv.weight, qkv_bias): a quantized qkv would be
    # used as raw uint8 / int8 weights
    bnb = pytest.importorskip("bitsandbytes")
    from models import zoo_inputs, zoo_model, zoo_run

    model = quant.quantize(zoo_model("eva02"), 8)
    qkv = model.blocks[0].attn.qkv
    assert type(qkv) is nn.Linear and quant.bnb_kind(model.blocks[0].attn.proj) == "Linear8bitLt"
    with torch.no_grad():  # the quantized EVA runs
        assert zoo_run(model.eval(), zoo_inputs("eva02")).isfinite().all()
    q8 = bnb.nn.Linear8bitLt(qkv.in_features, qkv.out_features, bias=qkv.bias is not None,
                             has_fp16_weights=False, threshold=0.0)
    q8.load_state_dict(qkv.state_dict())
    model.blocks[0].attn.qkv = q8.to("cpu")
    with pytest.raises(pv.UnsupportedArchitectureError, match=r"computes with qkv\.weight itself.*Linear8bitLt"):
        pv.apply(model, "lora", r=4, targets=["blocks.0.attn.qkv"])
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
