"""Tensor layouts written with einops give bitwise the tensors of the plain reshapes they replaced."""

from __future__ import annotations

import torch
from models import make_model
from torch import nn

import peftvision as pv
from peftvision.methods.lora import LoRAConv, LoRAFusedLinear
from peftvision.methods.svdiff import SpectralShift
from peftvision.methods.vpt import PromptTokens


def randomize(layer: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))


def test_grouped_conv_lora_delta_is_the_reshape_formula():
    layer = LoRAConv(nn.Conv2d(8, 12, 3, groups=2, padding=1), r=3, alpha=6.0)
    randomize(layer)
    g, r = 2, 3
    a = layer.lora_A.reshape(g, r, -1)  # (g, r, in/g·k·k)
    b = layer.lora_B.reshape(g, -1, r)  # (g, out/g, r)
    expected = (torch.bmm(b, a) * layer.scaling).reshape(12, 4, 3, 3)
    assert torch.equal(layer.delta_weight(), expected)


def test_fused_qkv_lora_delta_and_forward_are_the_reshape_formulas():
    layer = LoRAFusedLinear(nn.Linear(16, 48), "qv", r=2, alpha=2.0)
    randomize(layer)
    per_slot = torch.bmm(layer.lora_B, layer.lora_A) * layer.scaling  # (2, 16, 16)
    full = torch.zeros(3, 16, 16)
    full[[0, 2]] = per_slot
    assert torch.equal(layer.delta_weight(), full.reshape(48, 16))
    x = torch.randn(2, 5, 16)
    low = torch.nn.functional.linear(x, layer.lora_A.reshape(4, -1)).unflatten(-1, (2, 2))
    delta = torch.einsum("...nr,ndr->...nd", low, layer.lora_B) * layer.scaling  # (2, 5, 2, 16)
    out = layer.weighted_layer(x)
    expected = out + torch.cat([delta[..., 0, :], torch.zeros(2, 5, 16), delta[..., 1, :]], dim=-1)
    assert torch.equal(layer(x), expected)


def test_svdiff_conv_weight_is_factored_as_out_by_the_rest():
    conv = nn.Conv2d(4, 6, 3)
    shift = SpectralShift(conv, factors="both")
    u, s, vh = torch.linalg.svd(conv.weight.detach().reshape(6, -1), full_matrices=False)
    assert torch.equal(shift.svd_s, s) and torch.equal(shift.svd_u, u) and torch.equal(shift.svd_vh, vh)
    small = SpectralShift(conv)  # a conv keeps only U (6 x 6) by default, Vᵀ (6 x 36) implied by W
    assert torch.equal(small.svd_u, u) and small.svd_vh is None


def test_vpt_prompts_follow_the_prefix_tokens():
    model = pv.apply(make_model("vit"), "vpt", mode="shallow", tokens=3)
    layer = model.norm_pre
    assert isinstance(layer, PromptTokens)
    x = torch.randn(2, 1 + 16, 32)  # (B, CLS + patches, D)
    out = layer(x)  # (B, CLS + P + patches, D)
    expected = torch.cat([x[:, :1], layer.prompts.expand(2, -1, -1), x[:, 1:]], dim=1)
    assert torch.equal(out, expected)
