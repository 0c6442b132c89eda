"""The shared building blocks (issue 12 item 5): one per-channel affine layer for SSF, DiffFit's
scales and IA3; merged forwards and the architecture check done once by the framework."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from models import tiny_resnet, tiny_vit
from torch import nn

import peftvision as pv
from peftvision import registry
from peftvision.affine import ChannelAffineLayer
from peftvision.errors import MergeError
from peftvision.layers import AdapterLayer, AdditiveDeltaLayer
from peftvision.methods.base import ApplyContext, Method
from peftvision.methods.difffit import ChannelScale
from peftvision.methods.ia3 import IA3Layer
from peftvision.methods.ssf import SSFLayer


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_ssf_difffit_and_ia3_are_the_one_affine_layer():
    assert all(issubclass(c, ChannelAffineLayer) for c in (SSFLayer, ChannelScale, IA3Layer))


def test_ia3_on_an_input_scales_the_columns_and_unmerges_within_rounding():
    linear = nn.Linear(6, 4)
    w0, b0 = linear.weight.detach().clone(), linear.bias.detach().clone()
    layer = IA3Layer(linear, on_input=True)
    with torch.no_grad():
        layer.ia3_scale.copy_(_rand(6).abs() + 0.5)
    x = _rand(3, 5, 6, seed=1)
    scale = layer.ia3_scale.detach()
    expected = F.linear(x * scale, w0, b0)  # layer(l ⊙ x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    layer.merge()
    torch.testing.assert_close(linear.weight, w0 * scale[None, :], rtol=0, atol=0)  # W·diag(l), one rounding
    assert torch.equal(linear.bias, b0)  # an input scale leaves the bias alone
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(linear.weight, w0, rtol=2 * torch.finfo(torch.float32).eps, atol=0)


def test_ia3_on_a_fused_qkv_scales_only_k_and_v():
    qkv = nn.Linear(4, 12)
    layer = IA3Layer(qkv, on_input=False, start=4)
    assert layer.ia3_scale.shape == (8,)
    with torch.no_grad():
        layer.ia3_scale.fill_(2.0)
    x = _rand(2, 4, seed=2)
    base = qkv(x)
    out = layer(x)
    assert torch.equal(out[:, :4], base[:, :4])  # q untouched
    torch.testing.assert_close(out[:, 4:], 2 * base[:, 4:])
    layer.merge()
    torch.testing.assert_close(qkv(x), out)


def test_ia3_input_of_a_grouped_conv_refuses_merge_naming_why():
    conv = nn.Conv2d(4, 4, 3, groups=2)
    layer = IA3Layer(conv, on_input=True)
    layer.method_name = "ia3"
    assert "input of a grouped Conv2d" in layer.merge_blocker()
    with pytest.raises(MergeError, match="grouped Conv2d"):
        layer.merge()
    assert not layer.merged


def test_an_input_scale_that_would_overflow_half_columns_is_refused():
    linear = nn.Linear(3, 2).half()
    with torch.no_grad():
        linear.weight.fill_(1000.0)
    layer = IA3Layer(linear, on_input=True)
    with torch.no_grad():
        layer.ia3_scale.copy_(torch.tensor([1.0, 100.0, 1.0]))  # 1e5 > fp16's 65504, column 1 only
    assert "overflows torch.float16" in layer.merge_blocker()


def test_a_tiny_scale_is_stashed_so_unmerge_is_bitwise():
    linear = nn.Linear(3, 2)
    w0 = linear.weight.detach().clone()
    layer = IA3Layer(linear, on_input=False)
    with torch.no_grad():
        layer.ia3_scale.copy_(torch.tensor([0.0, 1.5]))  # a zero: ÷l cannot give W back
    layer.merge()
    assert torch.equal(linear.weight[0], torch.zeros(3))
    layer.unmerge()
    assert torch.equal(linear.weight, w0)


class _DoubleCounting(AdditiveDeltaLayer):
    """A third-party adapter whose forward never looks at `merged`."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.delta = nn.Parameter(torch.full_like(base_layer.weight, 0.1))

    def delta_weight(self) -> torch.Tensor:
        return self.delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + F.linear(x, self.delta)


def test_a_merged_layer_runs_its_base_layer_without_the_subclass_checking():
    linear = nn.Linear(5, 3)
    layer = _DoubleCounting(linear)
    x = _rand(4, 5, seed=3)
    adapted = layer(x)
    layer.merge()  # W + ΔW in the base: running the adapted forward too would add ΔW twice
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-6)


@pytest.fixture
def vit_only_method(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))

    @registry.register_method
    @dataclass
    class EveryLinear(Method):  # apply_to checks no family itself
        name: ClassVar[str] = "every-linear-test"
        kind: ClassVar[str] = "additive"
        architectures: ClassVar = ("vit",)

        def apply_to(self, ctx: ApplyContext) -> None:
            for name, _m in ctx.find(self, [nn.Linear], allowed=(nn.Linear,)):
                ctx.wrap(self, name, _DoubleCounting)

    return EveryLinear.name


def test_the_framework_refuses_a_family_a_method_was_not_written_for(vit_only_method):
    model = tiny_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pv.UnsupportedArchitectureError,
                       match=r"'every-linear-test' does not support ResNet .*written for timm VisionTransformer"):
        pv.apply(model, vit_only_method)
    assert pv.applied(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    vit = pv.apply(tiny_vit(), vit_only_method)
    assert any(isinstance(m, _DoubleCounting) for m in vit.modules())


class _Scale(nn.Module):  # holds neither weight nor bias (as timm's LayerScale)
    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(_rand(6, seed=4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def test_sparse_deltas_merge_through_the_shared_merge_and_unmerge_bitwise():
    from peftvision.methods.sparse_layers import SparseDeltaLayer

    base = _Scale()
    g0 = base.gamma.detach().clone()
    layer = SparseDeltaLayer(base, {"gamma": torch.tensor([1, 4])})
    with torch.no_grad():
        layer.values_gamma.copy_(torch.tensor([0.5, -0.25]))
    x = _rand(3, 6, seed=5)
    adapted = layer(x)
    assert type(layer).merge is AdapterLayer.merge and type(layer).unmerge is AdapterLayer.unmerge  # shared
    layer.merge()
    assert torch.equal(layer(x), adapted)  # W[i] + v written as the forward computes it
    layer.unmerge()
    assert torch.equal(base.gamma, g0)
