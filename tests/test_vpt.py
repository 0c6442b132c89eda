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
