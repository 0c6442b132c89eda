"""Bias tuning pays only for what it trains: no conv weight gradient is computed."""

import copy
import io
import pickle

import pytest
import torch
from models import make_inputs, make_model, run
from torch import nn

import peftvision as pv
from peftvision.surgery import BiasDecoupledConv2d, restore_conv_classes


def _conv_backward_node(out: torch.Tensor):
    """The ConvolutionBackward node that produced (part of) `out`."""
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith("ConvolutionBackward"):
            return node
        stack.extend(n for n, _ in node.next_functions)
    raise AssertionError("no convolution in the graph")


def test_bias_tuned_conv_keeps_weight_and_bias_out_of_conv_backward():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
    pv.apply(model, "bias")
    conv = model[0]
    assert type(conv) is BiasDecoupledConv2d and isinstance(conv, nn.Conv2d)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    node = _conv_backward_node(model(x))
    # next_functions: (input, weight, bias); frozen weight and no bias inside -> nothing to accumulate
    assert node.next_functions[1][0] is None and node.next_functions[2][0] is None


def test_plain_conv_with_trainable_bias_would_request_it():
    conv = nn.Conv2d(8, 16, 3, padding=1).requires_grad_(False)
    conv.bias.requires_grad_(True)
    node = _conv_backward_node(conv(torch.randn(2, 8, 10, 10, requires_grad=True)))
    assert node.next_functions[2][0] is not None  # the slow case the fast path avoids


def test_fast_path_same_outputs_and_gradients_as_plain_conv():
    model = pv.apply(make_model("unet"), "bias")
    naive = copy.deepcopy(model)
    restore_conv_classes(naive)
    assert any(isinstance(m, BiasDecoupledConv2d) for m in model.modules())
    assert not any(isinstance(m, BiasDecoupledConv2d) for m in naive.modules())
    inputs = make_inputs("unet")
    out_fast, out_naive = run(model, inputs), run(naive, inputs)
    torch.testing.assert_close(out_fast, out_naive, rtol=1e-5, atol=1e-6)
    out_fast.square().mean().backward()
    out_naive.square().mean().backward()
    for (n, p), q in zip(model.named_parameters(), naive.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("method", ["lora", "full", "norm"])
def test_fast_path_only_when_weight_frozen_and_bias_trains(method):
    model = pv.apply(make_model("unet"), method)
    assert not any(isinstance(m, BiasDecoupledConv2d) for m in model.modules())


def test_lora_plus_bias_uses_fast_path_under_the_wrapper():
    model = pv.apply(make_model("unet"), [pv.config("lora", targets=[nn.Conv2d]), "bias"])
    assert any(isinstance(m, BiasDecoupledConv2d) for m in model.modules())
    y = run(model, make_inputs("unet"))
    assert torch.isfinite(y).all()
    pv.unload(model)
    assert not any(isinstance(m, BiasDecoupledConv2d) for m in model.modules())


def test_fast_conv_bias_false_leaves_every_class_as_it_was():
    model = pv.apply(make_model("unet"), "bias", fast_conv_bias=False)
    types = [type(m) for m in make_model("unet").modules()]
    assert [type(m) for m in model.modules()] == types
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))
    assert not pv.applied(model).fast_conv_bias
    with pytest.raises(pv.ConfigError, match="fast_conv_bias=True differs from the first apply"):
        pv.apply(model, "norm", fast_conv_bias=True)
    pv.apply(model, "norm")  # later calls keep the first call's choice
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))


def test_fast_path_convs_pickle_as_plain_convs():
    """torch.save(model) of a bias-tuned model names nn.Conv2d, so it loads without peftvision
    as a plain model with the same outputs; deepcopy keeps the fast path."""
    model = pv.apply(make_model("unet"), "bias").eval()
    assert any(type(m) is BiasDecoupledConv2d for m in model.modules())
    data = pickle.dumps(model)
    assert b"BiasDecoupled" not in data and b"peftvision.surgery" not in data
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not any(isinstance(m, BiasDecoupledConv2d) for m in loaded.modules())
    assert [n for n, _ in loaded.named_modules()] == [n for n, _ in model.named_modules()]
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, make_inputs("unet")), run(model, make_inputs("unet")),
                                   rtol=1e-5, atol=1e-6)
    twin = copy.deepcopy(model)
    assert [type(m) for m in twin.modules()] == [type(m) for m in model.modules()]
    assert twin.conv_in.bias is not model.conv_in.bias
    assert torch.equal(twin.conv_in.bias, model.conv_in.bias)
