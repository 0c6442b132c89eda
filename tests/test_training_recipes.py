"""The training recipes the README shows work with adapters: autocast and gradient checkpointing."""

import torch

import peftvision as pv
from tests.models import tiny_vit


def lora_vit() -> torch.nn.Module:
    model = pv.apply(tiny_vit(), "lora", r=2).train()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.normal_()  # a non-identity adapter, so its gradients matter
    return model


def grads(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    model(x).square().mean().backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_gradient_checkpointing_gives_the_same_gradients():
    model, x = lora_vit(), torch.randn(2, 3, 32, 32)
    plain = grads(model, x)
    model.set_grad_checkpointing(True)
    for a, b in zip(plain, grads(model, x), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_autocast_runs_adapters_in_the_autocast_dtype():
    model, x = lora_vit(), torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    torch.testing.assert_close(out.float(), model(x), rtol=0.05, atol=0.05)  # bf16: ~3 digits
