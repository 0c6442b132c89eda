"""Models with adapters run under torch.compile and give the eager outputs."""

import pytest
import torch
from models import make_inputs, make_model, run

import peftvision as pv

CASES = [("vit", ["lora", "bias"]), ("vit", "vpt"), ("resnet", "ssf"), ("unet", "bias"),
         ("vit", "ssf"), ("vit", "svdiff"), ("unet", "svdiff")]  # svdiff: its training forms


@pytest.mark.parametrize("arch,method", CASES)
def test_compiles_with_dynamo_and_autograd(arch, method):
    # aot_eager traces forward and backward graphs like inductor, without C++ code generation
    model = pv.apply(make_model(arch), method).train()
    inputs = make_inputs(arch)
    eager = run(model, inputs)
    compiled = run(torch.compile(model, backend="aot_eager", fullgraph=arch != "unet"), inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    compiled.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_compiles_with_inductor():
    model = pv.apply(make_model("vit"), ["lora", "bias"]).train()
    inputs = make_inputs("vit")
    eager = run(model, inputs)
    compiled = run(torch.compile(model), inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
