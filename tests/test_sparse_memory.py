"""The selection pass of SH-PEFT / SPT keeps one score per weight and no copy of them."""

import pytest
import torch
from torch import nn

from peftvision.methods import sparse_selection
from peftvision.methods.sparse_importance import accumulate_gradients, default_loss
from peftvision.methods.sparse_selection import flat, top_k


def _reference_top_k(scores, k):  # the straightforward choice: topk, ties to the lowest positions
    kth = torch.topk(scores, k).values[-1]
    above = (scores > kth).nonzero().squeeze(1)
    ties = (scores == kth).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 7, 300, 999])
def test_top_k_equals_topk_with_ties(dtype, k, monkeypatch):
    monkeypatch.setattr(sparse_selection, "_CHUNK", 64)  # several chunks on a small tensor
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 50, (1000,), generator=g).to(dtype).square() * 1e-3  # many ties, zeros
    scores[::97] = torch.rand(11, generator=g, dtype=dtype)
    assert torch.equal(top_k(scores, k), _reference_top_k(scores, k))


def test_top_k_of_negative_scores_falls_back_to_topk():
    scores = torch.tensor([-1.0, 3.0, -2.0, 3.0, 0.5])
    assert top_k(scores, 2).tolist() == [1, 3]


def test_accumulated_scores_are_one_buffer_not_a_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    params = list(model.parameters())
    data = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(2)]
    acc = accumulate_gradients(model, params, data, None, default_loss, square=True, method="t")
    scores = flat(acc)
    assert scores.data_ptr() == acc[0].data_ptr() and scores.numel() == sum(p.numel() for p in params)
    # equal to the straightforward Σ_b g_b² per parameter
    expected = [torch.zeros_like(p) for p in params]
    for x, y in data:
        grads = torch.autograd.grad(default_loss(model(x), y), params)
        for e, gr in zip(expected, grads):
            e += gr * gr
    torch.testing.assert_close(scores, torch.cat([e.reshape(-1) for e in expected]))
    assert all(p.grad is None and p.requires_grad for p in params)  # the model as it was


def test_flat_copies_tensors_that_are_not_one_buffer():
    a, b = torch.ones(2, 2), torch.zeros(3)
    assert torch.equal(flat([a, b]), torch.tensor([1.0, 1, 1, 1, 0, 0, 0]))
