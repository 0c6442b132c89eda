"""Selective methods can train bare parameters by name (ViT pos_embed / cls_token): Dutt et al.'s
attention tuning trains `.attn.` parameters and `pos_embed`."""

import pytest
import torch

import peftvision as pv
from tests.models import tiny_vit


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_pos_embed_is_selected_trained_saved_and_restored(tmp_path):
    torch.manual_seed(0)
    model = tiny_vit()
    pv.apply(model, "attention", extra_params=["pos_embed", "cls_token"])
    names = _trainable(model)
    assert {"pos_embed", "cls_token"} <= names
    assert all(n.startswith(("blocks.", "head.")) or n in ("pos_embed", "cls_token") for n in names)
    attn = sum(p.numel() for n, p in model.named_parameters() if ".attn." in n)
    extra = model.pos_embed.numel() + model.cls_token.numel()
    assert pv.report(model).by_method["attention"] == attn + extra

    before = model.pos_embed.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert not torch.equal(model.pos_embed, before)  # it trains

    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    pv.save_adapter(model, tmp_path / "a")
    torch.manual_seed(0)
    fresh = tiny_vit()
    assert not torch.equal(fresh.pos_embed, model.pos_embed)
    pv.load_adapter(fresh, tmp_path / "a")
    fresh.eval()
    assert torch.equal(fresh.pos_embed, model.pos_embed)  # saved and restored
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)


def test_unknown_extra_param_names_the_bare_parameters():
    model = tiny_vit()
    with pytest.raises(pv.TargetError, match="pos_embed"):
        pv.apply(model, "attention", extra_params=["pos_embedding"])
    assert not any(p.requires_grad is False for p in model.parameters())  # model left as it was


def test_extra_params_as_a_string_is_refused():
    with pytest.raises(pv.TargetError, match=r"extra_params=\['pos_embed'\]"):
        pv.apply(tiny_vit(), "bias", extra_params="pos_embed")
