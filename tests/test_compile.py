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


def test_hotswap_on_a_compiled_model_does_not_recompile(tmp_path):
    """load_adapter(..., hotswap=True) writes into the adapter's own tensors: the compiled
    graph computes the new adapter's outputs and dynamo compiles nothing again."""
    compiles = []

    def counting_backend(graph, example_inputs):  # called once per graph dynamo compiles
        compiles.append(graph)
        return graph.forward

    def lora_model(seed):
        model = pv.apply(make_model("vit"), [pv.config("lora", r=2), "bias"], adapter_name="task").eval()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        return model

    other = lora_model(seed=2)
    pv.save_adapter(other, tmp_path / "other", adapter_name="task")
    with torch.no_grad():
        expected = run(other, make_inputs("vit"))
    torch._dynamo.reset()
    model = lora_model(seed=1)
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    with torch.no_grad():
        before = run(compiled, make_inputs("vit"))
        assert len(compiles) == 1
        assert not torch.allclose(before, expected)
        pv.load_adapter(compiled, tmp_path / "other", adapter_name="task", hotswap=True)
        after = run(compiled, make_inputs("vit"))
    assert len(compiles) == 1, "hotswap made dynamo compile again"
    torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-6)
    # the control: a change dynamo guards on (the layers' `active` flags) is counted
    with torch.no_grad(), pv.disable_adapters(compiled):
        run(compiled, make_inputs("vit"))
    assert len(compiles) == 2
