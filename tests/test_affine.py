"""The shared per-channel affine: autograd's results, without keeping its input for backward."""

import pytest
import torch
from torch import nn

from peftvision.affine import affine
from peftvision.methods.ssf import SSFLayer


def _plain(x, scale, shift, dim):
    shape = [1] * x.dim()
    shape[dim] = -1
    y = x * scale.view(shape)
    return y if shift is None else y + shift.view(shape)


def _grads(fn, x, scale, shift, dim, dy):
    x, scale = x.clone().requires_grad_(), scale.clone().requires_grad_()
    shift = None if shift is None else shift.clone().requires_grad_()
    y = fn(x, scale, shift, dim)
    y.backward(dy)
    return y, x.grad, scale.grad, None if shift is None else shift.grad


@pytest.mark.parametrize("shape,dim", [((4, 7, 6), -1), ((3, 5, 4, 4), 1), ((2, 6), 1), ((2, 6), -1)])
@pytest.mark.parametrize("with_shift", [True, False])
@pytest.mark.parametrize("zero_in_scale", [False, True])
def test_outputs_and_gradients_equal_autograd(shape, dim, with_shift, zero_in_scale):
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    channels = shape[dim]
    scale = 1 + 0.3 * torch.randn(channels, generator=g)
    if zero_in_scale:
        scale[0] = 0.0  # cannot rebuild x from y there: kept as autograd does
    shift = 0.1 * torch.randn(channels, generator=g) if with_shift else None
    ours = _grads(affine, x, scale, shift, dim, dy)
    ref = _grads(_plain, x, scale, shift, dim, dy)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=0)  # dy ⊙ γ: exact
    torch.testing.assert_close(ours[2], ref[2], rtol=1e-5, atol=1e-5)  # x rebuilt from y
    if with_shift:
        torch.testing.assert_close(ours[3], ref[3], rtol=0, atol=0)


def test_frozen_scale_and_no_input_grad():
    x, scale, shift = torch.randn(3, 4), torch.rand(4) + 0.5, torch.randn(4)
    shift.requires_grad_()
    affine(x, scale, shift).sum().backward()  # only β trains
    torch.testing.assert_close(shift.grad, torch.full((4,), 3.0))


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(seen.values())


def test_ssf_between_linears_keeps_no_extra_activation():
    # LayerNorm -> SSF -> Linear -> SSF -> GELU -> Linear, as in a ViT block: SSF folds into the
    # norm, and the Linear's scaled output is GELU's saved input, so SSF adds no activation to what
    # the frozen chain keeps (autograd's x * γ + β would keep both SSF inputs: 5 tensors more)
    torch.manual_seed(0)
    base = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    for p in base.parameters():
        p.requires_grad_(False)
    x = torch.randn(8, 50, 64, requires_grad=True)
    frozen = _saved_bytes(base, x)
    ssf = nn.Sequential(SSFLayer(base[0]), SSFLayer(base[1]), base[2], base[3])
    extra = _saved_bytes(ssf, x) - frozen
    assert extra <= 2 * 64 * 4  # the folded norm's weight and bias (C,), no (B, N, C) tensor


def _norm(kind: str) -> nn.Module:
    if kind == "timm":
        from timm.layers import LayerNorm

        return LayerNorm(16)
    return nn.LayerNorm(16, elementwise_affine=kind == "affine")


@pytest.mark.parametrize("kind", ["affine", "no-affine", "timm"])
def test_ssf_after_layer_norm_equals_scaling_its_output(kind):
    torch.manual_seed(0)
    norm = _norm(kind)
    for p in norm.parameters():
        p.data.normal_()  # a trained norm, not the identity init
    layer = SSFLayer(norm, init_std=0.3)
    x = torch.randn(2, 5, 16, requires_grad=True)
    dy = torch.randn(2, 5, 16)
    ours = layer(x)
    ours_grads = torch.autograd.grad(ours, (x, layer.ssf_scale, layer.ssf_shift), dy)
    ref = norm(x) * layer.ssf_scale + layer.ssf_shift
    ref_grads = torch.autograd.grad(ref, (x, layer.ssf_scale, layer.ssf_shift), dy)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)  # fp32 rounding of the fold
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_nchw_output_modified_in_place_still_trains():
    # a CNN's SSF output goes through ReLU(inplace=True): the kept tensor must not be that output
    scale, shift = (torch.rand(3) + 0.5).requires_grad_(), torch.zeros(3, requires_grad=True)
    x = torch.randn(2, 3, 4, 4)
    torch.relu_(affine(x, scale, shift, dim=1)).sum().backward()
    torch.testing.assert_close(scale.grad, ((x * scale.view(1, 3, 1, 1) + 0) > 0).mul(x).sum((0, 2, 3)))
