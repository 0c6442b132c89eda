"""Merge / unmerge / unload never corrupt weights (issue 11 items 2, 3, 4, 7).

- a merge whose inverse does not exist in the model's dtype keeps the exact weights and unmerge
  writes them back bitwise; a refused merge changes nothing;
- layers that transform their own weight inside forward refuse to merge;
- unload(merge=False) gives back the original model after training;
- adapters beside a half-precision base train in fp32 (GradScaler, bf16 autocast).
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import loss_fn, make_inputs, make_model, make_target, run
from test_conformance import CASES, SPECS, randomize_adapters
from torch import nn

import peftvision as pv
from peftvision.layers import AdapterLayer
from peftvision.state import get_state, iter_parameters


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == before.keys()
    differ = [k for k in before if not torch.equal(now[k], before[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"


def train_steps(model: nn.Module, arch: str, steps: int = 2, dtype: torch.dtype | None = None) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        inputs = make_inputs(arch)
        if dtype is not None:
            inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
        out = run(model, inputs).float()
        loss_fn(arch, out, make_target(arch, out)).backward()
        opt.step()
        opt.zero_grad()


# ---- item 2: unmerge never writes NaN or garbage ----------------------------------------------

@pytest.mark.parametrize("scale", [0.0, 1e-30])
def test_ssf_zero_or_tiny_scale_unmerges_bitwise(scale):
    torch.manual_seed(0)
    model = pv.apply(nn.Sequential(nn.Linear(6, 4, bias=False)), "ssf", targets=["0"])
    with torch.no_grad():
        model[0].ssf_scale[1] = scale  # (γ·W)/γ cannot give W back
    before = state_copy(model)
    x = torch.randn(3, 6)
    with torch.no_grad():
        y = model(x)
        pv.merge(model)
        torch.testing.assert_close(model(x), y)
        pv.unmerge(model)
    assert_state_equal(model, before)  # bitwise, no NaN, and the merge-created bias is gone
    pv.merge(model)
    plain = pv.unload(model, merge=False)
    assert torch.isfinite(plain[0].weight).all()


def test_ssf_zero_scale_on_vit_unload_restores_exactly():
    base = make_model("vit")
    original = state_copy(base)
    model = pv.apply(base, "ssf")
    with torch.no_grad():
        model.blocks[0].mlp.fc1.ssf_scale[0] = 0.0
    pv.merge(model)
    plain = pv.unload(model, merge=False).state_dict()
    assert torch.equal(plain["blocks.0.mlp.fc1.weight"], original["blocks.0.mlp.fc1.weight"])
    assert torch.equal(plain["blocks.0.mlp.fc1.bias"], original["blocks.0.mlp.fc1.bias"])
    for k, v in original.items():  # the other layers ran (γ·W)/γ: within rounding
        torch.testing.assert_close(plain[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("singular", [False, True])
def test_tsa_alignment_unmerge_restores_head_bitwise(dtype, singular):
    model = pv.apply(make_model("resnet").to(dtype), pv.config("tsa", alignment=True))
    randomize_adapters(model)
    if singular:
        with torch.no_grad():
            model.fc.tsa_beta[0] = 0.0  # β has no inverse
    head = model.fc.base_layer.weight
    before = head.detach().clone()
    pv.merge(model)
    assert not torch.equal(head, before)
    pv.unmerge(model)
    assert torch.equal(head, before)  # bitwise: no β⁻¹ needed


def test_tsa_alignment_merge_equals_unmerged_outputs_in_half():
    model = pv.apply(make_model("resnet").to(torch.bfloat16), pv.config("tsa", alignment=True))
    randomize_adapters(model)
    model.eval()
    x = make_inputs("resnet")[0].to(torch.bfloat16)
    with torch.no_grad():
        y = model(x)
        pv.merge(model)
        torch.testing.assert_close(model(x), y, rtol=0.05, atol=0.05)  # bf16: ~3 significant digits


# ---- item 3: merge is never silently wrong ------------------------------------------------------

def _std_conv_models():
    from timm.layers import ScaledStdConv2d, StdConv2d

    return {"StdConv2d": lambda: StdConv2d(3, 8, 3, padding=1),
            "ScaledStdConv2d": lambda: ScaledStdConv2d(3, 8, 3, padding=1)}


def _weight_norm_linear():
    return torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 8))


def _old_weight_norm_linear():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated hook-based weight_norm
        return torch.nn.utils.weight_norm(nn.Linear(3, 8))


class OwnForwardLinear(nn.Linear):
    def forward(self, x):  # e.g. a weight clamp, a quantiser...
        return nn.functional.linear(x, self.weight.clamp(-0.1, 0.1), self.bias)


LAYERS = {**_std_conv_models(),
          "parametrized weight_norm": _weight_norm_linear,
          "hook weight_norm": _old_weight_norm_linear,
          "own forward": lambda: OwnForwardLinear(3, 8)}
METHODS = {"lora": dict(r=2), "ssf": {}, "svdiff": {}, "tsa": {}}
REASON = {"StdConv2d": "own forward", "ScaledStdConv2d": "own forward", "own forward": "own forward",
          "parametrized weight_norm": "parametrized", "hook weight_norm": "recomputes its weight"}


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("method", list(METHODS))
def test_layers_that_transform_their_weight_refuse_to_merge(layer, method):
    torch.manual_seed(0)
    inner = LAYERS[layer]()
    if method == "tsa" and not isinstance(inner, nn.Conv2d):
        pytest.skip("TSA adapts convs only")
    # a second, plain layer: the refusal must leave it unmerged too
    model = nn.Sequential(inner, nn.Identity() if isinstance(inner, nn.Conv2d) else nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1) if isinstance(inner, nn.Conv2d) else nn.Linear(8, 8))
    pv.apply(model, method, targets=["0", "2"], **METHODS[method])
    randomize_adapters(model)
    before = state_copy(model)
    with pytest.raises(pv.MergeError, match=REASON[layer]):
        pv.merge(model)
    assert_state_equal(model, before)
    assert not any(m.merged for m in model.modules() if isinstance(m, AdapterLayer))
    with pytest.raises(pv.MergeError, match=REASON[layer]):
        pv.unload(model, merge=True)
    assert_state_equal(model, before)


def test_spt_lora_part_refuses_a_std_conv():
    from timm.layers import StdConv2d

    from peftvision.methods.spt import SPTLoRAConv

    layer = SPTLoRAConv(StdConv2d(3, 8, 3, padding=1), r=2, alpha=2.0)
    with pytest.raises(pv.MergeError, match="own forward"):
        layer.merge()
    assert not layer.merged


def test_timm_norms_still_merge():
    """timm's LayerNorm / LayerNorm2d / GroupNorm use their weight as stored: they merge."""
    from timm.layers import GroupNorm, LayerNorm, LayerNorm2d

    for norm, x in ((LayerNorm(8), torch.randn(2, 5, 8)), (LayerNorm2d(8), torch.randn(2, 8, 3, 3)),
                    (GroupNorm(8, 2), torch.randn(2, 8, 3, 3))):
        model = pv.apply(nn.Sequential(norm), "ssf", targets=["0"])
        with torch.no_grad():
            y = model(x)
            pv.merge(model)
            torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


# ---- item 4: unload(merge=False) gives back the original model -----------------------------------

@pytest.mark.parametrize("arch,method", CASES)
def test_unload_after_training_restores_original_exactly(arch, method):
    base = make_model(arch)
    original = state_copy(base)
    model = pv.apply(base, copy.deepcopy(SPECS[method]))
    train_steps(model, arch)  # train mode: BatchNorm statistics move too
    assert_state_equal(pv.unload(model, merge=False), original)


def test_keep_original_false_keeps_no_copies_and_leaves_trained_values():
    base = make_model("vit")
    original = state_copy(base)
    model = pv.apply(base, "full", keep_original=False)
    assert not get_state(model).originals
    train_steps(model, "vit", steps=1)
    plain = pv.unload(model, merge=False)
    assert any(not torch.equal(v, original[k]) for k, v in plain.state_dict().items())
    with pytest.raises(pv.ConfigError, match="keep_original"):
        pv.apply(pv.apply(make_model("vit"), "bias"), "lora", keep_original=False)


def test_full_keeps_one_copy_of_the_model():
    model = pv.apply(make_model("vit"), "full")
    originals = get_state(model).originals
    params = dict(model.named_parameters())
    assert set(params) <= set(originals)
    assert sum(t.numel() for t in originals.values()) == sum(
        t.numel() for t in model.state_dict().values())


@pytest.mark.parametrize("method", ["lora", "svdiff", "ssf"])
def test_unload_after_merge_cycles(method):
    """LoRA / SSF unmerge runs the inverse: within rounding; SV-Diff keeps W: bitwise."""
    base = make_model("vit")
    original = state_copy(base)
    model = pv.apply(base, method)
    randomize_adapters(model)
    for _ in range(5):
        pv.merge(model)
        pv.unmerge(model)
    plain = pv.unload(model, merge=False).state_dict()
    for k, v in original.items():
        if method == "svdiff":
            assert torch.equal(plain[k], v), k
        else:
            torch.testing.assert_close(plain[k], v, rtol=1e-5, atol=1e-6)


def test_unload_merged_loads_strictly_into_a_fresh_base():
    model = pv.apply(make_model("vit"), "lora", r=4)
    randomize_adapters(model)
    merged = pv.unload(model, merge=True).state_dict()
    make_model("vit").load_state_dict(merged, strict=True)


def test_unload_merged_warns_about_added_bias_keys():
    base = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    model = pv.apply(base, "ssf", targets=["0"])
    with pytest.warns(UserWarning, match=r"added 1 key\(s\).*: 0\.bias"):
        plain = pv.unload(model, merge=True)
    fresh = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    missing, unexpected = fresh.load_state_dict(plain.state_dict(), strict=False)
    assert (missing, unexpected) == ([], ["0.bias"])


# ---- item 7: half-precision bases --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapter_parameters_are_fp32_beside_a_half_base(dtype):
    model = pv.apply(make_model("vit").to(dtype), "lora", r=4)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    assert model.blocks[0].attn.qkv.base_layer.weight.dtype == dtype
    kept = pv.apply(make_model("vit").to(dtype), "lora", r=4, adapter_dtype="base")
    assert all(p.dtype == dtype for n, p in kept.named_parameters() if "lora_" in n)
    with pytest.raises(pv.ConfigError, match="adapter_dtype"):
        pv.apply(make_model("vit"), "lora", adapter_dtype="fp32")


@pytest.mark.parametrize("arch,method", CASES)
def test_every_method_trains_on_a_bf16_base(arch, method):
    """Forward and backward on a bf16 base: outputs stay bf16, adapter gradients are fp32."""
    model = pv.apply(make_model(arch).to(torch.bfloat16), copy.deepcopy(SPECS[method]))
    inputs = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in make_inputs(arch))
    out = run(model, inputs)
    assert out.dtype == torch.bfloat16
    loss_fn(arch, out.float(), make_target(arch, out.float())).backward()
    for e in iter_parameters(model):
        if e.adapter is not None and e.param.requires_grad:
            assert e.param.dtype == torch.float32 and e.param.grad.dtype == torch.float32, e.name


def test_fp16_base_trains_with_grad_scaler():
    """The standard recipe: fp16 weights, GradScaler. Trainable parameters must be fp32."""
    torch.manual_seed(0)
    model = pv.apply(make_model("vit").half(), "lora", r=4, train_head=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = make_inputs("vit")[0].half()
    for _ in range(2):
        out = model(x)
        scaler.scale(loss_fn("vit", out.float(), make_target("vit", out))).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))  # steps were taken


def test_fp16_base_with_fp32_head_under_autocast_and_grad_scaler():
    model = make_model("vit").half()
    model.get_classifier().float()  # trainable user parameters in fp32 too
    pv.apply(model, "ssf")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = make_inputs("vit")[0].half()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        scaler.scale(loss_fn("vit", out.float(), make_target("vit", out))).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert torch.isfinite(model(x)).all()


def test_bf16_autocast_training_matches_fp32_closely():
    losses = {}
    for autocast in (False, True):
        model = pv.apply(make_model("vit"), "lora", r=4)
        randomize_adapters(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(make_inputs("vit")[0])
        loss = loss_fn("vit", out.float(), make_target("vit", out))
        loss.backward()
        losses[autocast] = loss.item()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert abs(losses[True] - losses[False]) < 0.05 * abs(losses[False])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["lora", "ssf", "svdiff"])
def test_fp32_adapter_merges_into_a_half_base(dtype, method):
    """Merged weight = round(W + ΔW) in the base dtype, ΔW taken in fp32; outputs agree."""
    model = pv.apply(make_model("vit").to(dtype), method)
    randomize_adapters(model)
    model.eval()
    qkv = model.blocks[0].attn.qkv
    w = qkv.weighted_layer.weight.detach().clone()
    x = make_inputs("vit")[0].to(dtype)
    with torch.no_grad():
        y = model(x)
        pv.merge(model)
        if method == "lora":
            expected = (w.float() + qkv.lora_B.float() @ qkv.lora_A.float() * qkv.scaling).to(dtype)
            torch.testing.assert_close(qkv.weighted_layer.weight, expected, rtol=0, atol=0)
        torch.testing.assert_close(model(x).float(), y.float(), rtol=0.05, atol=0.05)
        pv.unmerge(model)
    assert qkv.weighted_layer.weight.dtype == dtype
    torch.testing.assert_close(qkv.weighted_layer.weight, w, rtol=0.02, atol=0.02)


def test_ssf_merge_that_would_overflow_half_is_refused():
    model = pv.apply(nn.Sequential(nn.Linear(4, 3).half()), "ssf", targets=["0"])
    with torch.no_grad():
        model[0].base_layer.weight[1, 2] = 60000.0
        model[0].ssf_scale[1] = 2.0  # γ·W = 120000 > fp16's 65504: the merged weight would be inf
    before = state_copy(model)
    with pytest.raises(pv.MergeError, match="overflows"):
        pv.merge(model)
    assert_state_equal(model, before)


@pytest.mark.parametrize("method", ["shpeft", "spt"])
def test_sparse_methods_on_a_half_base(method):
    from test_sparse_methods import batches

    half = torch.float16
    data = [tuple(t.to(half) if t.is_floating_point() else t for t in b) for b in batches("vit")]
    model = pv.apply(make_model("vit").to(half), method, data=data, fraction=0.03)
    randomize_adapters(model, 0.01)
    trained = [e for e in iter_parameters(model) if e.adapter is not None and e.param.requires_grad]
    assert trained and all(e.param.dtype == torch.float32 for e in trained)
    x = make_inputs("vit")[0].to(half)
    out = model(x)
    assert out.dtype == half
    loss_fn("vit", out.float(), make_target("vit", out)).backward()
    assert all(e.param.grad.dtype == torch.float32 for e in trained)
    before = state_copy(model)
    with torch.no_grad():
        y = model(x)
        pv.merge(model)
        torch.testing.assert_close(model(x), y, rtol=0.01, atol=0.01)
        pv.unmerge(model)
    assert_state_equal(model, before)  # sparse entries and SPT's LoRA: bitwise
