"""VPT's token layout on the timm ViT variants it supports."""

import pytest
import torch
from models import tiny_vit

import peftvision as pv
from peftvision.methods.vpt import PromptTokens

VARIANTS = {
    "cls": {},
    "registers": {"reg_tokens": 2},
    "no_embed_class": {"no_embed_class": True},
    "avg_pool_no_cls": {"class_token": False, "global_pool": "avg", "fc_norm": True},
    "avg_pool_with_cls": {"global_pool": "avg"},
}


def block_inputs(model, x):
    seen = []
    blocks = [getattr(b, "weighted_layer", b) for b in model.blocks]  # the timm Block inside a wrapper
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach())) for b in blocks]
    model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["shallow", "deep"])
def test_prompts_sit_after_prefix_tokens_and_leave_before_the_norm(variant, mode):
    torch.manual_seed(0)
    model = tiny_vit(**VARIANTS[variant]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)  # (B, prefix + 16 patches, D)
        plain_inputs = block_inputs(model, x)
    pv.apply(model, "vpt", mode=mode, tokens=3)
    prefix = model.num_prefix_tokens
    prompt_layers = [m for m in model.modules() if isinstance(m, PromptTokens)]
    assert len(prompt_layers) == (1 if mode == "shallow" else len(model.blocks))
    with torch.no_grad():
        adapted = model.forward_features(x)
        inputs = block_inputs(model, x)
        logits = model.forward_head(adapted)
    assert adapted.shape == features.shape  # prompts removed before the final norm
    assert logits.shape == (2, 5)
    # block 0 sees [prefix, P0, patches]; prefix and patch embeddings are untouched
    assert inputs[0].shape[1] == plain_inputs[0].shape[1] + 3
    torch.testing.assert_close(inputs[0][:, :prefix], plain_inputs[0][:, :prefix])
    torch.testing.assert_close(inputs[0][:, prefix + 3:], plain_inputs[0][:, prefix:])
    for i, layer in enumerate(prompt_layers):  # deep: block i sees its own prompts
        expected = layer.prompts.expand(2, -1, -1)
        torch.testing.assert_close(inputs[i][:, prefix:prefix + 3], expected)


def test_prompt_init_follows_the_paper():
    model = pv.apply(tiny_vit(), "vpt", mode="deep")
    bound = (6.0 / (3 * 8 * 8 + 32)) ** 0.5  # patch 8, width 32
    prompts = torch.cat([m.prompts for m in model.modules() if isinstance(m, PromptTokens)])
    assert prompts.abs().max() <= bound
    assert prompts.abs().max() > 0.8 * bound  # uniform over the whole range, not a tiny init


def test_training_moves_prompts_and_unload_restores_the_model():
    model = tiny_vit()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pv.apply(model, "vpt")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    opt.step()
    pv.unload(model)
    state = model.state_dict()
    for key in original:
        if not key.startswith("head."):  # the head trained
            assert torch.equal(state[key], original[key]), key
    assert state.keys() == original.keys()


# ---- Swin: the VPT paper's Swin variant (prompts in every window) ------------------------------

def tiny_swin(v2: bool = False, depths=(2, 2)):
    import timm

    name = "swinv2_tiny_window8_256" if v2 else "swin_tiny_patch4_window7_224"
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, img_size=32, patch_size=4, window_size=4,
                             embed_dim=16, depths=depths, num_heads=(1, 2))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_block_without_prompts_is_timms_block(v2):
    """The runner's block and window attention, with zero prompts, compute timm's own block:
    shifted and unshifted windows, the shift mask, and (v2) cosine attention and its biases."""
    from peftvision.methods.vpt_swin import block_with_prompts

    model = tiny_swin(v2).eval()
    blocks = [b for stage in model.layers for b in stage.blocks]
    assert any(any(b.shift_size) for b in blocks)  # a shifted block is covered
    with torch.no_grad():
        for p in model.parameters():  # v2's q/v biases start at zero: make every term count
            p.add_(torch.randn_like(p) * 0.02)
        x = model.patch_embed(torch.randn(2, 3, 32, 32))
        for stage in model.layers:
            x = stage.downsample(x)
            for block in stage.blocks:
                ours, prompts = block_with_prompts(block, x, x.new_zeros(2, 0, x.shape[-1]))
                x = block(x)
                assert prompts.shape == (2, 0, x.shape[-1])
                assert torch.allclose(ours, x, rtol=1e-5, atol=1e-5), (ours - x).abs().max()


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("mode", ["shallow", "deep"])
def test_swin_prompts_stay_with_their_sample(v2, mode):
    """Each window attends to its own sample's prompts: a sample's output does not depend on the
    rest of the batch (the paper's code pairs windows with other samples' prompts once the
    prompts differ per sample, i.e. after the first shallow block)."""
    model = pv.apply(tiny_swin(v2), "vpt", mode=mode, tokens=3).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        batch = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batch, alone, rtol=1e-5, atol=1e-5), (batch - alone).abs().max()


def test_swin_prompts_change_every_stage_and_leave_before_the_norm():
    from peftvision.methods.vpt_swin import SwinPrompts

    base = tiny_swin()
    model = pv.apply(tiny_swin(), "vpt", mode="deep", tokens=3).eval()
    (runner,) = [m for m in model.modules() if isinstance(m, SwinPrompts)]
    assert [tuple(p.shape) for p in runner.prompts] == [(1, 3, 16)] * 2 + [(1, 3, 32)] * 2
    bound = (6 / (3 * 16 + 16)) ** 0.5  # the paper: sqrt(6 / (3·patch area + embed dim))
    assert all(p.abs().max() <= bound for p in runner.prompts)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_features(x).shape == base.forward_features(x).shape  # (B, 4, 4, 32): no prompts
        y0 = model(x)
        for p in runner.prompts:  # every block's own prompt set reaches the output
            kept = p.clone()
            p.normal_()  # (a constant shift would vanish in norm1)
            assert not torch.allclose(model(x), y0)
            p.copy_(kept)


def test_swin_prompt_merging_is_the_papers():
    """Patch merging of a prompt = the layer's norm and reduction of 4 copies of it."""
    from peftvision.methods.vpt_swin import merge_prompts

    merging = tiny_swin().layers[1].downsample.eval()
    p = torch.randn(2, 3, 16)
    with torch.no_grad():
        want = merging.reduction(merging.norm(torch.cat([p] * 4, dim=-1)))
        assert torch.allclose(merge_prompts(merging, p), want, rtol=1e-6, atol=1e-6)


def test_swin_vpt_refuses_an_adapter_it_would_skip():
    from peftvision.layers import AdapterLayer
    from peftvision.surgery import wrap_module

    model = pv.apply(tiny_swin(), "vpt", mode="shallow", tokens=2)
    wrap_module(model, "layers.base_layer.0.blocks.1.attn", AdapterLayer)  # as a later method would
    with pytest.raises(pv.UnsupportedArchitectureError, match=r"layers\.0\.blocks\.1\.attn would be skipped"):
        model(torch.randn(1, 3, 32, 32))
