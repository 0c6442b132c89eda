"""SV-Diff and DiffFit beyond the conformance matrix: the maths against brute force, where the
DiffFit scales sit, exact unmerge, and the Stable Diffusion 1.5 trainable counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import loss_fn, make_inputs, make_model, make_target, run
from torch import nn

import peftvision as pv
from peftvision.methods.difffit import ChannelScale
from peftvision.methods.svdiff import SpectralShift
from peftvision.surgery import get_module


def _spectral_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SpectralShift)}


def _brute_force_weight(shift: SpectralShift, weight: torch.Tensor | None = None) -> torch.Tensor:
    """U·diag(ReLU(σ+δ))·Vᵀ from a float64 SVD of the base weight (not the layer's buffers, of
    which one may be dropped), reshaped to the weight; δ pairs with σ in descending order."""
    weight = shift.weighted_layer.weight if weight is None else weight
    u, s, vh = torch.linalg.svd(weight.detach().double().reshape(weight.shape[0], -1), full_matrices=False)
    full = u @ torch.diag(F.relu(s + shift.svd_delta.detach().double())) @ vh
    return full.reshape(weight.shape).float()


@pytest.mark.parametrize("method", ["svdiff", "difffit", ["svdiff", "difffit"]])
def test_identity_at_init_is_bitwise(method):
    base = make_model("unet").eval()
    inputs = make_inputs("unet")
    with torch.no_grad():
        y0 = run(base, inputs)
        # without the conv-bias fast path, which rounds differently
        model = pv.apply(copy.deepcopy(base), method, fast_conv_bias=False).eval()
        assert torch.equal(run(model, inputs), y0)


# ---- SV-Diff -------------------------------------------------------------------------------

LAYERS = {  # name -> (layer factory, input shape)
    "linear-wide": (lambda: nn.Linear(12, 7), (3, 5, 12)),  # 7 singular values
    "linear-tall": (lambda: nn.Linear(6, 10, bias=False), (4, 6)),  # 6
    "conv2d-groups": (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4), (2, 8, 6, 6)),  # 12 x (2·3·3)
    "conv2d-stride": (lambda: nn.Conv2d(4, 6, 3, stride=2), (2, 4, 9, 9)),
    "conv1d-groups": (lambda: nn.Conv1d(6, 4, 5, padding=2, groups=2), (2, 6, 11)),
    "conv1d-dilation": (lambda: nn.Conv1d(6, 4, 3, padding=1, dilation=2), (2, 6, 11)),
}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("path", ["weight", "factored", "replace"])
def test_svdiff_forward_equals_brute_force_reconstruction(name, path, monkeypatch):
    torch.manual_seed(0)
    factory, x_shape = LAYERS[name]
    layer = factory()
    if path != "weight" and getattr(layer, "groups", 1) != 1:
        pytest.skip("grouped convs always take the weight-space path")
    monkeypatch.setattr(SpectralShift, "training_form", lambda self, x, direct: path)
    model = nn.Sequential(layer)
    weight = layer.weight.detach().clone()
    pv.apply(model, "svdiff", targets=["0"], factors="both")
    shift = model[0]
    k = min(weight.shape[0], weight[0].numel())
    assert shift.svd_delta.shape == (k,)
    # the buffers are an SVD of the (C_out, C_in/g·k·k) weight
    u, s, vh = shift.svd_u, shift.svd_s, shift.svd_vh
    assert u.is_contiguous() and vh.is_contiguous()  # LAPACK's column-major U, Vᵀ slow convs ~10x
    assert torch.allclose((u * s) @ vh, weight.reshape(weight.shape[0], -1), atol=1e-6)
    assert torch.allclose(u.T @ u, torch.eye(k), atol=1e-5) and torch.allclose(vh @ vh.T, torch.eye(k), atol=1e-5)
    with torch.no_grad():
        shift.svd_delta.copy_(torch.randn(k) * s.mean())
        shift.svd_delta[0] = -2 * s[0]  # ReLU clips the largest singular value to zero
    x = torch.randn(x_shape)
    brute = _brute_force_weight(shift)
    conv = isinstance(layer, nn.modules.conv._ConvNd)
    expected = layer._conv_forward(x, brute, layer.bias) if conv else F.linear(x, brute, layer.bias)
    got = model(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()
    pv.merge(model)  # merging writes that weight
    assert torch.allclose(layer.weight, brute, atol=1e-6)


@pytest.mark.parametrize("size, train_w, form", [(4, True, "factored"), (64, True, "weight"),
                                                (4, False, "replace"), (64, False, "replace")])
def test_svdiff_picks_the_cheaper_form(size, train_w, form):
    model = pv.apply(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)), "svdiff", targets=["0"],
                     factors="both")
    model[0].weighted_layer.weight.requires_grad_(train_w)  # W trains too: replace would drop its grad
    # with W trained, at 16 positions U·(shift ⊙ Vᵀx) is cheaper than rebuilding ΔW, at 4096
    # weight space is; W frozen: U·(σ' ⊙ Vᵀx) in place of the conv costs 10/9 of the conv
    assert model[0].training_form(torch.zeros(1, 64, size, size), direct=True) == form


def test_svdiff_no_svd_after_apply(monkeypatch):
    model = pv.apply(make_model("unet"), "svdiff").train()

    def refuse(*args, **kwargs):
        raise AssertionError("an SVD ran after apply")

    for fn in ("svd", "svdvals"):
        monkeypatch.setattr(torch.linalg, fn, refuse)
    monkeypatch.setattr(torch, "svd", refuse)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inputs = make_inputs("unet")
    out = run(model, inputs)
    loss_fn("unet", out, make_target("unet", out)).backward()
    opt.step()
    assert any(bool(m.svd_delta.abs().sum() > 0) for m in _spectral_layers(model).values())


def test_svdiff_buffers_are_not_saved_and_unmerge_is_bitwise(tmp_path):
    model = pv.apply(make_model("unet"), "svdiff")
    layers = _spectral_layers(model)
    with torch.no_grad():
        for m in layers.values():
            m.svd_delta.normal_(0, 0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not any(k.endswith(("svd_u", "svd_s", "svd_vh")) for k in before)  # recomputed, never saved
    pv.merge(model)
    assert all(m._stash_weight is not None for m in layers.values())
    assert not any("backup" in k for k in model.state_dict())
    pv.unmerge(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # bitwise, weights included
    assert not any(m._stash_weight is not None for m in layers.values())  # the copy is freed
    pv.save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(k.endswith("svd_delta") for k in saved)


@pytest.mark.parametrize("norm, x_shape", [(nn.LayerNorm(6), (2, 3, 6)), (nn.GroupNorm(2, 6), (2, 6, 4, 4))])
def test_svdiff_norm_delta_is_additive(norm, x_shape):
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
        norm.bias.normal_(0, 0.2)
    model = nn.Sequential(norm)
    w0, b0 = norm.weight.detach().clone(), norm.bias.detach().clone()
    pv.apply(model, "svdiff", targets=["0"])
    assert model[0].svd_delta.shape == w0.shape and model[0].svd_u is None
    delta = torch.randn(w0.shape) * 0.3
    with torch.no_grad():
        model[0].svd_delta.copy_(delta)
    x = torch.randn(x_shape)
    reference = copy.deepcopy(norm)
    with torch.no_grad():
        reference.weight.copy_(w0 + delta)
    assert torch.allclose(model(x), reference(x), atol=1e-6)
    # only δ trains; the norm's own weight and bias stay frozen
    model(x).square().sum().backward()
    assert model[0].svd_delta.grad is not None and norm.weight.grad is None and norm.bias.grad is None
    pv.merge(model)
    assert torch.equal(norm.weight, w0 + delta) and torch.equal(norm.bias, b0)
    pv.unmerge(model)
    assert torch.equal(norm.weight, w0)


def test_svdiff_nested_in_another_adapter_matches_merge():
    # SSF wraps the LayerNorm first: SV-Diff then adds δ ⊙ x̂ beside it (the nested path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6))
    pv.apply(model, pv.config("ssf", targets=[nn.LayerNorm, nn.Linear]))
    pv.apply(model, pv.config("svdiff", targets=[nn.LayerNorm, nn.Linear]))
    assert isinstance(model[1], SpectralShift) and model[1].base_layer is not model[1].weighted_layer
    with torch.no_grad():
        for m in _spectral_layers(model).values():
            m.svd_delta.normal_(0, 0.3)
    x = torch.randn(4, 5)
    y = model(x)
    pv.merge(model)
    assert torch.allclose(model(x), y, rtol=1e-5, atol=1e-6)
    pv.unmerge(model)
    assert torch.allclose(model(x), y, rtol=1e-5, atol=1e-6)


# ---- DiffFit -------------------------------------------------------------------------------

def _scale_like_difffit(base: nn.Module, applied: nn.Module) -> list:
    """Hooks on `base` that multiply each module's output by the γ DiffFit put on that module."""
    names = {n.replace(".base_layer", "") for n, m in applied.named_modules() if isinstance(m, ChannelScale)}
    hooks = []
    for name in names:
        gamma = get_module(applied, name).difffit_scale.detach()
        hooks.append(get_module(base, name).register_forward_hook(lambda mod, args, out, g=gamma: out * g))
    return hooks


def test_difffit_scales_sit_on_branches_and_projections():
    base = make_model("unet").eval()
    model = pv.apply(copy.deepcopy(base), "difffit").eval()
    scaled = {n.replace(".base_layer", "") for n, m in model.named_modules() if isinstance(m, ChannelScale)}
    blocks = [n for n, m in base.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    expected = {f"{b}.{branch}" for b in blocks for branch in ("attn1", "attn2", "ff")}
    expected |= {f"{b}.{a}.{p}" for b in blocks for a in ("attn1", "attn2")
                 for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert scaled == expected
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ChannelScale):
                m.difffit_scale.uniform_(0.5, 1.5)
    hooks = _scale_like_difffit(base, model)
    inputs = make_inputs("unet")
    with torch.no_grad():
        expected_out, got = run(base, inputs), run(model, inputs)
    for h in hooks:
        h.remove()
    assert torch.allclose(got, expected_out, rtol=1e-5, atol=1e-5), (got - expected_out).abs().max()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_difffit_on_mmdit_blocks(family):
    """DiffFit was refused on SD3 / Flux (joint attentions return (image, context) pairs). Its γ
    sit on both streams' q/k/v/out projections (to_out.0 and to_add_out being the attention
    branches), on ff / ff_context and on a single-stream block's proj_out; each one changes the
    output, and the model equals the base model with every γ as a hook on its module."""
    from models import zoo_inputs, zoo_model, zoo_run

    base = zoo_model(family).eval()
    model = pv.apply(copy.deepcopy(base), "difffit").eval()
    scaled = {n.replace(".base_layer", "") for n, m in model.named_modules() if isinstance(m, ChannelScale)}
    joint = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    if family == "sd3":  # the last block keeps no context stream: no to_add_out, ff_context, add_q γ
        expected = {f"transformer_blocks.0.attn.{p}" for p in joint} | {"transformer_blocks.0.ff",
                                                                         "transformer_blocks.0.ff_context"}
        expected |= {f"transformer_blocks.1.attn.{p}" for p in joint[:4] + joint[5:7]} | {"transformer_blocks.1.ff"}
    else:
        expected = {f"transformer_blocks.0.attn.{p}" for p in joint} | {"transformer_blocks.0.ff",
                                                                         "transformer_blocks.0.ff_context"}
        expected |= {f"single_transformer_blocks.0.attn.{p}" for p in joint[:3]}
        expected |= {"single_transformer_blocks.0.proj_out"}
    assert scaled == expected
    inputs = zoo_inputs(family)
    with torch.no_grad():
        y0 = zoo_run(model, inputs)
        for name in sorted(expected):
            gamma = get_module(model, name).difffit_scale
            gamma.fill_(1.5)
            assert not torch.equal(zoo_run(model, inputs), y0), f"γ on {name} has no effect"
            gamma.fill_(1.0)
        for m in model.modules():
            if isinstance(m, ChannelScale):
                m.difffit_scale.uniform_(0.5, 1.5)
        hooks = _scale_like_difffit(base, model)
        want, got = zoo_run(base, inputs), zoo_run(model, inputs)
    for h in hooks:
        h.remove()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    # the selective part: biases and the norms' affine parameters (Flux's q/k RMSNorms)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("norm1.linear.bias") for n in trainable)
    if family == "flux":
        assert any("norm_q" in n for n in trainable)


def test_difffit_zero_attn2_scale_removes_cross_attention():
    base = make_model("unet").eval()
    model = pv.apply(copy.deepcopy(base), "difffit").eval()
    blocks = [n for n, m in base.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    with torch.no_grad():
        for b in blocks:
            get_module(model, f"{b}.attn2").difffit_scale.zero_()
    hooks = [get_module(base, f"{b}.attn2").register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
             for b in blocks]
    inputs = make_inputs("unet")
    with torch.no_grad():
        no_cross, got = run(base, inputs), run(model, inputs)
        other_context = (inputs[0], inputs[1], torch.randn_like(inputs[2]))
        unchanged = run(model, other_context)  # the text context no longer reaches the output
    for h in hooks:
        h.remove()
    assert torch.allclose(got, no_cross, rtol=1e-5, atol=1e-6)
    assert torch.allclose(unchanged, got, rtol=1e-5, atol=1e-6)
    # unmerge cannot divide by γ = 0: merge keeps the exact weights and unmerge writes them back
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        pv.merge(model)
        torch.testing.assert_close(run(model, inputs), got, rtol=1e-5, atol=1e-6)
        pv.unmerge(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())  # bitwise, no NaN


def test_difffit_refuses_to_merge_a_branch_with_residual_connection():
    model = pv.apply(make_model("unet"), "difffit")
    block = next(m for m in model.modules() if type(m).__name__ == "BasicTransformerBlock")
    block.attn1.base_layer.residual_connection = True
    with pytest.raises(pv.MergeError, match="residual_connection"):
        pv.merge(model)


def test_difffit_on_a_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    base = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([1, 5]),
                  class_labels=torch.tensor([0, 3]))
    with torch.no_grad():
        y0 = base(**inputs).sample
    model = pv.apply(copy.deepcopy(base), "difffit").eval()
    with torch.no_grad():
        assert torch.allclose(model(**inputs).sample, y0, rtol=1e-5, atol=1e-6)
        n_scales = sum(m.difffit_scale.numel() for m in model.modules() if isinstance(m, ChannelScale))
        assert n_scales == 2 * (2 * 16 + 4 * 16)  # DiT blocks: attn1 + ff branches, attn1's 4 projections
        for m in model.modules():
            if isinstance(m, ChannelScale):
                m.difffit_scale.uniform_(0.5, 1.5)
        y = model(**inputs).sample
        pv.merge(model)
        assert torch.allclose(model(**inputs).sample, y, rtol=1e-4, atol=1e-5)


def test_difffit_needs_transformer_blocks():
    with pytest.raises(pv.UnsupportedArchitectureError, match="BasicTransformerBlock"):
        pv.apply(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), "difffit")


# ---- Stable Diffusion 1.5 trainable counts (the table) -------------------------------

def _sd15_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # shapes only: apply (and its SVDs) runs on meta tensors
        return UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                    cross_attention_dim=768, attention_head_dim=8)


@pytest.mark.slow
@pytest.mark.parametrize("method, target, exact", [
    ("bias", 0.34e6, 343_684),
    ("norm", 0.20e6, 200_320),
    (pv.config("lora", r=4), 0.80e6, 797_184),
    ("difffit", 0.58e6, 581_124),
    # SV-Diff: the 0.22M counts the spectral shifts only (222,696); the reference also
    # shifts every norm weight (+100,160), which we do, so the method trains 322,856.
    ("svdiff", None, 322_856),
])
def test_sd15_trainable_counts(method, target, exact):
    model = pv.apply(_sd15_unet(), copy.deepcopy(method))
    trainable = pv.report(model).trainable
    assert trainable == exact
    if target is not None:
        assert abs(trainable - target) <= 0.03 * target
    if method == "svdiff":
        spectral = sum(m.svd_delta.numel() for m in _spectral_layers(model).values() if m.svd_s is not None)
        assert spectral == 222_696 and abs(spectral - 0.22e6) <= 0.03 * 0.22e6
