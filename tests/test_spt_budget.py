"""SPT trains at most the budget it was given, LoRA parts and whole vectors counted."""

import pytest
import torch
from models import make_model

import peftvision as pv


def _data(n: int = 3, batch: int = 4) -> list:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(n)]


def _backbone_counts(model):
    head = {id(p) for p in model.get_classifier().parameters()}
    params = [(n, p) for n, p in model.named_parameters() if id(p) not in head]
    scope = sum(p.numel() for n, p in params if "." in n)  # ViT cls_token / pos_embed are out of scope
    train = sum(p.numel() for _, p in params if p.requires_grad)
    return scope, train


@pytest.mark.parametrize("arch", ["vit", "resnet"])
@pytest.mark.parametrize("opts", [dict(fraction=0.01), dict(fraction=0.05), dict(count=3000),
                                  dict(fraction=0.01, alpha=1000.0)])
def test_trained_parameters_stay_within_the_budget(arch, opts):
    scope, _ = _backbone_counts(make_model(arch))
    budget = opts.get("count") or round(opts["fraction"] * scope)
    model = pv.apply(make_model(arch), "spt", data=_data(), **opts)
    _, train = _backbone_counts(model)
    assert 0 < train <= budget
    if "alpha" not in opts:  # (with LoRA made easy, one more LoRA may not fit in what is left)
        assert train >= 0.5 * budget  # the budget is used, not dropped to a few weights


def test_trained_counts_lora_and_whole_vectors():
    from peftvision.methods.sparse import ScopeEntry
    from peftvision.methods.spt import trained

    w, v = torch.nn.Parameter(torch.zeros(10, 10)), torch.nn.Parameter(torch.zeros(10))
    entries = [ScopeEntry("a.weight", "a", "weight", w), ScopeEntry("b.bias", "b", "bias", v)]
    # LoRA of cost 40 once ≥ 40/10 chosen; the vector whole once ≥ 10/5 chosen
    assert trained([3, 1], entries, [40, None], 10.0, 5.0) == 4
    assert trained([4, 1], entries, [40, None], 10.0, 5.0) == 41
    assert trained([4, 2], entries, [40, None], 10.0, 5.0) == 50
