"""SV-Diff's training forms (replace, project, factored, weight space) and factor layouts give the
outputs and gradients of the straightforward float64 W' = U·diag(ReLU(σ+δ))·Vᵀ, layer by layer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import loss_fn, make_inputs, make_model, make_target, run
from torch import nn

import peftvision as pv
from peftvision.methods.svdiff import SpectralShift

LAYERS = {  # name -> (layer factory, input shape); wide, tall and square, Linear and conv
    "linear-wide": (lambda: nn.Linear(24, 5), (3, 4, 24)),  # 5 x 24: U kept under "one"
    "linear-tall": (lambda: nn.Linear(5, 24, bias=False), (7, 5)),  # 24 x 5: V kept
    "linear-square": (lambda: nn.Linear(8, 8), (6, 8)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5)),  # 6 x 36
    "conv2d-stride": (lambda: nn.Conv2d(3, 5, 3, stride=2), (2, 3, 9, 9)),
    "conv1d-tall": (lambda: nn.Conv1d(2, 9, 2), (2, 2, 7)),  # 9 x 4: V kept, weight space
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5)),
}
FORMS = {"both": ["replace", "factored", "weight"], "one": ["project", "weight"]}


def _reference(layer: nn.Module, weight: torch.Tensor, delta: torch.Tensor, x: torch.Tensor):
    """float64 y = op(x, U·diag(ReLU(σ+δ))·Vᵀ, b) with δ and x as leaves: the straightforward way."""
    u, s, vh = torch.linalg.svd(weight.double().reshape(weight.shape[0], -1), full_matrices=False)
    d = delta.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    w = (u * F.relu(s + d) @ vh).reshape(weight.shape)
    bias = None if layer.bias is None else layer.bias.detach().double()
    if isinstance(layer, nn.Linear):
        return F.linear(x64, w, bias), d, x64
    ref = copy.deepcopy(layer).double()
    return ref._conv_forward(x64, w, bias), d, x64


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("factors, form", [(f, p) for f, forms in FORMS.items() for p in forms])
def test_forms_match_the_reference_outputs_and_gradients(name, factors, form, monkeypatch):
    torch.manual_seed(0)
    factory, x_shape = LAYERS[name]
    layer = factory()
    grouped = getattr(layer, "groups", 1) != 1
    tall_conv = isinstance(layer, nn.Conv1d) and not grouped
    if form != "weight" and (grouped or (form == "project" and tall_conv)):
        pytest.skip("grouped convs and a conv that keeps V train in weight space only")
    weight = layer.weight.detach().clone()
    model = pv.apply(nn.Sequential(layer), "svdiff", targets=["0"], factors=factors)
    shift = model[0]
    assert (shift.svd_u is None or shift.svd_vh is None) == (factors == "one")
    chosen = []
    original = SpectralShift.training_form
    monkeypatch.setattr(SpectralShift, "training_form",
                        lambda self, x, direct: chosen.append(original(self, x, direct)) or form)
    with torch.no_grad():
        shift.svd_delta.copy_(torch.randn(shift.svd_delta.shape) * shift.svd_s.mean())
        shift.svd_delta[0] = -2 * shift.svd_s[0]  # ReLU clips the largest singular value to zero
    x = torch.randn(x_shape, requires_grad=True)
    got = model(x)
    expected, d64, x64 = _reference(layer, weight, shift.svd_delta, x)
    g = torch.randn(got.shape)
    (got * g).sum().backward()
    (expected * g.double()).sum().backward()
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shift.svd_delta.grad, d64.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and chosen  # W stays frozen; the form was asked for
    if factors == "one":  # the auto choice with one factor is always the projection or weight space
        assert chosen[0] == ("weight" if grouped or tall_conv else "project")


@pytest.mark.parametrize("name", ["linear-square", "conv2d"])
def test_replace_at_zero_delta_is_the_base_within_rounding(name, monkeypatch):
    # U·diag(σ)·Vᵀ is W only up to fp32 rounding: replace starts at the base model within ~1e-6
    # relative, not bitwise (the inference path and the other forms are bitwise: ΔW = 0 exactly)
    torch.manual_seed(0)
    factory, x_shape = LAYERS[name]
    layer = factory()
    base = copy.deepcopy(layer)
    model = pv.apply(nn.Sequential(layer), "svdiff", targets=["0"], factors="both")
    monkeypatch.setattr(SpectralShift, "training_form", lambda self, x, direct: "replace")
    x = torch.randn(x_shape)
    y, y0 = model(x), base(x)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6 * y0.abs().max().item())
    with torch.no_grad():
        assert torch.equal(model(x), y0)  # the cached W + ΔW with ΔW = 0: bitwise


def test_ill_conditioned_weight_keeps_both_factors():
    # a rank-1 conv weight: dividing by σ ~ 0 would be meaningless, so V stays beside U
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(4, 1, 1, 1) * torch.randn(1, 3, 3, 3))
    shift = pv.apply(nn.Sequential(conv), "svdiff", targets=["0"])[0]
    assert shift.svd_u is not None and shift.svd_vh is not None
    well = pv.apply(nn.Sequential(nn.Conv2d(3, 4, 3)), "svdiff", targets=["0"])[0]
    assert well.svd_u is not None and well.svd_vh is None  # a conv keeps U (4 x 4), not Vᵀ (4 x 27)


def test_factors_option_is_checked():
    with pytest.raises(ValueError, match="factors='two'"):
        pv.apply(nn.Sequential(nn.Linear(4, 4)), "svdiff", targets=["0"], factors="two")


@pytest.mark.parametrize("factors", ["one", "auto"])
def test_one_factor_model_trains_merges_and_unmerges_bitwise(factors):
    torch.manual_seed(0)
    both = pv.apply(make_model("unet"), "svdiff", factors="both")
    model = pv.apply(make_model("unet"), "svdiff", factors=factors)
    model.load_state_dict(both.state_dict())
    kept = [m for m in model.modules() if isinstance(m, SpectralShift) and m.svd_s is not None]
    assert any(m.svd_vh is None or m.svd_u is None for m in kept)
    inputs = make_inputs("unet")
    for m in (both, model):
        out = run(m.train(), inputs)
        loss_fn("unet", out, make_target("unet", out)).backward()
    for (n, p), q in zip(both.named_parameters(), model.parameters()):
        if p.requires_grad:  # the same gradients as with both factors kept
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        for m in kept:
            m.svd_delta.normal_(0, 0.05)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        y = run(model.eval(), inputs)
        pv.merge(model)
        torch.testing.assert_close(run(model, inputs), y, rtol=1e-4, atol=1e-5)
        pv.unmerge(model)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
