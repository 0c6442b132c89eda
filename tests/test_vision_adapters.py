"""Vision adapters (issue 14 item 2): bottleneck adapters, Convpass, FacT, RepAdapter on a tiny
timm ViT and a tiny timm Swin (pretrained=False)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_resnet, tiny_vit
from torch import nn

import peftvision as pv
from peftvision.methods.fact import FacTFactors, FacTLinear
from peftvision.methods.repadapter import RepAdapterLinear
from peftvision.state import iter_parameters

D, DEPTH, HIDDEN, CLASSES = 32, 2, 64, 5  # tiny_vit: embed 32, 2 blocks, mlp_ratio 2


def tiny_swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                           num_heads=(1, 2), num_classes=CLASSES)


FACTORIES = {"vit": tiny_vit, "swin": tiny_swin}
SWIN_BLOCK_DIMS = [16, 16, 32, 32]  # embed_dim · 2^stage for each of the 2 + 2 blocks


def make(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FACTORIES[arch]()


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# (id, method, options, architectures)
CASES = [
    ("adapter-houlsby", "adapter", {}, ("vit", "swin")),
    ("adapter-pfeiffer", "adapter", {"placement": "pfeiffer"}, ("vit", "swin")),
    ("convpass", "convpass", {}, ("vit",)),
    ("fact-tt", "fact", {}, ("vit",)),
    ("fact-tk", "fact", {"format": "tk"}, ("vit",)),
    ("repadapter", "repadapter", {}, ("vit", "swin")),
]
PAIRS = [pytest.param(arch, method, opts, id=f"{cid}-{arch}")
         for cid, method, opts, archs in CASES for arch in archs]
MERGEABLE = [p for p in PAIRS if p.values[1] in ("fact", "repadapter")]
NOT_MERGEABLE = [p for p in PAIRS if p.values[1] in ("adapter", "convpass")]


def block_widths(arch: str) -> list[int]:
    return [D] * DEPTH if arch == "vit" else SWIN_BLOCK_DIMS


def expected_count(arch: str, method: str, opts: dict) -> int:
    """The trainable adapter parameters, from each paper's layout (written apart from the code)."""
    widths = block_widths(arch)
    if method == "adapter":
        m, sites = 8, (2 if opts.get("placement", "houlsby") == "houlsby" else 1)
        return sum(sites * (w * m + m + m * w + w) for w in widths)  # down + up, with biases
    if method == "convpass":
        d = 8
        return len(widths) * 2 * (D * d + d + 9 * d * d + d + d * D + D)
    if method == "fact":
        r, k = 8, HIDDEN // D  # fc1 / fc2 hold k D x D slices each
        slices = 3 + 1 + k + k  # q, k, v, proj, fc1, fc2
        if opts.get("format", "tt") == "tt":
            return 2 * r * D + DEPTH * slices * r * r  # U, V + one r x r core per slice
        return 2 * r * D + r ** 3 + DEPTH * slices * r  # U, V, core c + one r-vector per slice
    if method == "repadapter":
        h, g = 8, 2
        return sum(2 * (w * h + h + w * (h // g) + w) for w in widths)  # A dense, B group-wise
    raise AssertionError(method)


def head_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.get_classifier().parameters())


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {e.name: e.param for e in iter_parameters(model) if e.adapter is not None}


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 3) -> None:
    """Make every adapter parameter non-trivial (as after training)."""
    g = torch.Generator().manual_seed(seed)
    for p in adapter_params(model).values():
        p.add_(torch.randn(p.shape, generator=g) * 0.1)


def applied(arch, method, opts, seed=0):
    return pv.apply(make(arch, seed), method, **opts)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- identity at init, trainable set and count ----------------------------------------------

@pytest.mark.parametrize("arch,method,opts", PAIRS)
def test_identity_at_init(arch, method, opts):
    x = inputs()
    base = make(arch).eval()
    model = applied(arch, method, opts).eval()
    assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("arch,method,opts", PAIRS)
def test_only_the_adapters_and_head_train_and_their_count_is_the_papers_layout(arch, method, opts):
    model = applied(arch, method, opts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {f"head.{n}" if arch == "vit" else f"head.fc.{n}"
            for n, _ in model.get_classifier().named_parameters()}
    assert trainable == set(adapter_params(model)) | head
    count = sum(p.numel() for p in adapter_params(model).values())
    assert count == expected_count(arch, method, opts)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == \
        count + head_count(model)


@pytest.mark.parametrize("arch,method,opts", PAIRS)
def test_a_training_step_changes_only_the_trainable_parameters(arch, method, opts):
    model = applied(arch, method, opts).train()
    perturb(model)  # non-zero up-projections, so every adapter parameter gets a gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = nn.functional.cross_entropy(model(inputs()), torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable
    assert changed & set(adapter_params(model))


# ---- merge -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,method,opts", MERGEABLE)
def test_merged_equals_unmerged_and_unmerge_restores(arch, method, opts):
    model = applied(arch, method, opts).eval()
    perturb(model)
    x = inputs()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x)
    assert relative_error(out, make(arch).eval()(x)) > 1e-3  # the adapter does something
    pv.merge(model)
    assert relative_error(model(x), out) <= 1e-5
    pv.unmerge(model)
    assert torch.allclose(model(x), out, rtol=0, atol=1e-6)
    after = model.state_dict()
    assert after.keys() == weights.keys()
    for k, v in weights.items():
        if method == "repadapter":  # unmerge writes the kept weight back
            assert torch.equal(after[k], v), k
        else:  # W + ΔW − ΔW: within one rounding
            assert torch.allclose(after[k], v, rtol=1e-6, atol=1e-7), k


def test_repadapter_merges_into_a_qkv_without_bias_and_unmerge_removes_it():
    model = pv.apply((torch.manual_seed(0), tiny_vit(qkv_bias=False))[1], "repadapter").eval()
    perturb(model)
    x = inputs()
    out = model(x)
    pv.merge(model)
    assert model.blocks[0].attn.qkv.base_layer.bias is not None
    assert relative_error(model(x), out) <= 1e-5
    pv.unmerge(model)
    assert model.blocks[0].attn.qkv.base_layer.bias is None


def test_repadapter_on_swin_v2_adapts_the_attention_input_and_refuses_merge():
    """Swin v2's attention reads qkv.weight itself (F.linear with its own q/k/v biases), so an
    adapter on qkv was refused. The adapter now sits on the attention's input: the model equals the
    base model with x + s·(B·(A·x + a) + b) fed to every attention and fc1 (B group-wise, as
    dense block-diagonal here); merge is refused (no key bias) and changes nothing."""
    import copy

    import timm

    torch.manual_seed(0)
    base = timm.create_model("swinv2_tiny_window8_256", pretrained=False, num_classes=CLASSES, img_size=32,
                             patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2)).eval()
    model = pv.apply(copy.deepcopy(base), "repadapter", dropout=0.0, scale=0.7).eval()
    perturb(model)
    hooks = []
    for name, layer in model.named_modules():
        if isinstance(layer, RepAdapterLinear):
            site = name.replace(".base_layer", "")
            dense_b = torch.block_diag(*layer.B_weight.detach().unflatten(0, (layer.groups, -1)))  # (D, h)
            a_w, a_b, b_b = layer.A.weight.detach(), layer.A.bias.detach(), layer.B_bias.detach()

            def shift(mod, args, kwargs, dense_b=dense_b, a_w=a_w, a_b=a_b, b_b=b_b):
                x = args[0]
                return (x + 0.7 * ((x @ a_w.T + a_b) @ dense_b.T + b_b), *args[1:]), kwargs

            hooks.append(base.get_submodule(site).register_forward_pre_hook(shift, with_kwargs=True))
    sites = {n.replace(".base_layer", "") for n, m in model.named_modules() if isinstance(m, RepAdapterLinear)}
    assert sites == {f"layers.{i}.blocks.{j}.{s}" for i in (0, 1) for j in (0, 1) for s in ("attn", "mlp.fc1")}
    x = inputs()
    with torch.no_grad():
        want, got = base(x), model(x)
    for h in hooks:
        h.remove()
    assert relative_error(got, want) <= 1e-5
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pv.MergeError, match="Swin v2 has no key bias"):
        pv.merge(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch,method,opts", NOT_MERGEABLE)
def test_merge_is_refused_clearly_and_changes_nothing(arch, method, opts):
    model = applied(arch, method, opts)
    perturb(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pv.MergeError, match=rf"cannot merge {method} \(.*non-linearit"):
        pv.merge(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


# ---- save / load, unload -------------------------------------------------------------------

@pytest.mark.parametrize("arch,method,opts", PAIRS)
def test_save_then_load_onto_a_fresh_base_is_bitwise(arch, method, opts, tmp_path):
    model = applied(arch, method, opts).eval()
    perturb(model)
    pv.save_adapter(model, tmp_path)
    loaded = pv.load_adapter(make(arch), tmp_path).eval()
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = inputs()
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("arch,method,opts", PAIRS)
def test_unload_restores_the_original_state_dict_exactly(arch, method, opts):
    original = {k: v.clone() for k, v in make(arch).state_dict().items()}
    model = applied(arch, method, opts).train()
    perturb(model)
    nn.functional.cross_entropy(model(inputs()), torch.tensor([0, 1])).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    if method in ("fact", "repadapter"):
        pv.merge(model)
        pv.unmerge(model)
    pv.unload(model)
    after = model.state_dict()
    assert after.keys() == original.keys()
    for k, v in original.items():
        if method == "fact" and k.startswith("blocks."):  # FacT's unmerge: W + ΔW − ΔW
            assert torch.allclose(after[k], v, rtol=1e-6, atol=1e-7), k
        else:  # RepAdapter's unmerge writes the kept weight back; the others never merged
            assert torch.equal(after[k], v), k
    assert not any(type(m).__module__.startswith("peftvision") for m in model.modules())


# ---- method specifics and refusals -----------------------------------------------------------

def test_fact_factors_are_shared_by_every_layer_and_saved_once():
    model = applied("vit", "fact", {})
    layers = [m for m in model.modules() if isinstance(m, FacTLinear)]
    assert len(layers) == DEPTH * 4
    assert len({id(layer.shared) for layer in layers}) == 1
    assert sum(isinstance(m, FacTFactors) for m in model.modules()) == 1
    assert [n for n in model.state_dict() if n.endswith((".U", ".V"))] == \
        ["blocks.0.attn.qkv.factors.U", "blocks.0.attn.qkv.factors.V"]


@pytest.mark.parametrize("method", ["convpass", "fact"])
def test_vit_only_methods_refuse_swin_and_leave_it_as_it_was(method):
    model = make("swin")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pv.UnsupportedArchitectureError,
                       match=rf"{method}.*SwinTransformer.*written for timm VisionTransformer .*supports: vit$"):
        pv.apply(model, method)
    assert pv.applied(model) is None
    assert model.state_dict().keys() == before.keys()


@pytest.mark.parametrize("method", ["adapter", "repadapter"])
def test_vision_adapters_refuse_a_cnn_naming_what_they_support(method):
    with pytest.raises(pv.UnsupportedArchitectureError,
                       match="ResNet .*written for timm VisionTransformer .*'vit'.*timm Swin v1, v2 .*'swin'"):
        pv.apply(tiny_resnet(), method)


def test_convpass_names_the_grid_when_the_token_count_differs():
    model = applied("vit", "convpass", {})
    tokens = torch.randn(2, 10, D)  # 1 class token + 9 patches, not the 4x4 grid
    with pytest.raises(ValueError, match="4x4 patch grid"):
        model.blocks[0](tokens)


@pytest.mark.parametrize("methods", [["adaptformer", "convpass"], ["convpass", "adaptformer"]])
def test_convpass_and_adaptformer_refuse_to_share_a_block(methods):
    # both re-run the timm Block's steps; nested, the outer one would skip the inner silently
    model = pv.apply(make("vit"), methods[0])
    with pytest.raises(pv.ConfigError, match="both re-run the block's steps"):
        pv.apply(model, methods[1])
    assert [m.name for m in pv.applied(model).methods] == [methods[0]]


# ---- merge properties over shapes (standalone layers, against a float64 reference) -------------

PROPS = settings(max_examples=20, deadline=None)


@PROPS
@given(width=st.sampled_from([4, 6, 8, 12]), out=st.integers(1, 9), hidden=st.sampled_from([2, 4, 6]),
       groups=st.sampled_from([1, 2]), scale=st.floats(-3, 3), bias=st.booleans(), seed=st.integers(0, 99))
@torch.no_grad()
def test_repadapter_merge_matches_a_float64_reference(width, out, hidden, groups, scale, bias, seed):
    torch.manual_seed(seed)
    base = nn.Linear(width, out, bias=bias)
    layer = RepAdapterLinear(base, hidden, groups, scale, dropout=0.0)
    perturb(layer, seed)
    x = torch.randn(3, 5, width)
    # reference: x' = x + s·(B_dense·(A·x + a) + b_B), written with a dense block-diagonal B
    dense_b = torch.zeros(width, hidden, dtype=torch.float64)
    for g in range(groups):
        rows, cols = slice(g * width // groups, (g + 1) * width // groups), \
            slice(g * hidden // groups, (g + 1) * hidden // groups)
        dense_b[rows, cols] = layer.B_weight.double()[rows]
    a_w, a_b, b_b = layer.A.weight.double(), layer.A.bias.double(), layer.B_bias.double()
    w0 = base.weight.detach().double()
    b0 = base.bias.detach().double() if bias else torch.zeros(out, dtype=torch.float64)
    x64 = x.double()
    expected = F.linear(x64 + scale * (F.linear(F.linear(x64, a_w, a_b), dense_b) + b_b), w0, b0)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    ref_w = w0 + scale * w0 @ dense_b @ a_w
    atol = 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(unmerged.double(), expected, rtol=1e-5, atol=atol)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=atol)
    torch.testing.assert_close(base.weight.double(), ref_w, rtol=1e-5,
                               atol=1e-5 * float(ref_w.abs().max()))
    layer.unmerge()
    assert (base.bias is None) == (not bias)


@PROPS
@given(width=st.sampled_from([2, 4, 8]), slices=st.integers(1, 4), split_input=st.booleans(),
       rank=st.integers(1, 5), fmt=st.sampled_from(["tt", "tk"]), scale=st.floats(-3, 3),
       seed=st.integers(0, 99))
@torch.no_grad()
def test_fact_merge_matches_a_float64_reference(width, slices, split_input, rank, fmt, scale, seed):
    torch.manual_seed(seed)
    base = nn.Linear(width * slices if split_input else width, width if split_input else width * slices)
    factors = FacTFactors(width, rank, fmt, base.weight)
    layer = FacTLinear(base, factors, fmt, slices, split_input, scale, dropout=0.0, owner=True)
    perturb(layer, seed)
    u, v = factors.U.double(), factors.V.double()
    cores = layer.cores.double() if fmt == "tt" else \
        torch.stack([sum(factors.core.double()[:, :, k] * layer.mix.double()[j, k] for k in range(rank))
                     for j in range(slices)])
    blocks = [scale * v @ cores[j] @ u for j in range(slices)]  # each D x D
    w0 = base.weight.detach().double()
    ref_w = w0 + (torch.cat(blocks, dim=1) if split_input else torch.cat(blocks, dim=0))
    x = torch.randn(3, base.in_features)
    expected = F.linear(x.double(), ref_w, base.bias.detach().double())
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    atol = 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(unmerged.double(), expected, rtol=1e-5, atol=atol)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=atol)
    torch.testing.assert_close(base.weight.double(), ref_w, rtol=1e-5,
                               atol=1e-5 * float(ref_w.abs().max()))


@pytest.mark.parametrize("vit_options", [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}])
@torch.no_grad()
def test_convpass_bypass_convolves_prefix_tokens_as_1x1_images_and_patches_on_the_grid(vit_options):
    torch.manual_seed(0)
    model = pv.apply(tiny_vit(**vit_options), "convpass", dropout=0.0).eval()
    perturb(model)
    bypass = model.blocks[0].attn_bypass
    prefix, (rows, cols) = model.num_prefix_tokens, bypass.grid
    h = torch.randn(2, prefix + rows * cols, D)

    def act(t):
        return t * torch.sigmoid(1.702 * t)  # QuickGELU

    z = act(bypass.down(h))  # (B, N, d)
    d = z.shape[-1]
    # a prefix token is a 1x1 image run through the full padded 3x3 conv
    z_prefix = nn.functional.conv2d(z[:, :prefix].reshape(-1, d, 1, 1), bypass.conv.weight,
                                    bypass.conv.bias, padding=1).reshape(2, prefix, d)
    grid = z[:, prefix:].reshape(2, rows, cols, d).permute(0, 3, 1, 2)  # (B, d, H, W)
    z_patch = nn.functional.conv2d(grid, bypass.conv.weight, bypass.conv.bias, padding=1)
    z_patch = z_patch.permute(0, 2, 3, 1).reshape(2, rows * cols, d)
    expected = bypass.up(act(torch.cat([z_prefix, z_patch], dim=1)))
    torch.testing.assert_close(bypass(h), expected, rtol=1e-5, atol=1e-6)
    assert model(inputs()).shape == (2, CLASSES)
