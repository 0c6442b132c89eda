"""SV-Diff inference reuses W + ΔW between forwards, and rebuilds it whenever δ or W change."""

import pytest
import torch
from models import make_inputs, make_model, run

import peftvision as pv
from peftvision.methods.svdiff import SpectralShift


def _shifted(arch: str):
    model = pv.apply(make_model(arch), "svdiff")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SpectralShift):
                m.svd_delta.normal_(0, 0.05)  # a trained δ, not the identity
    return model.eval()


def _count_rebuilds(monkeypatch) -> list[int]:
    calls = [0]
    original = SpectralShift.delta_weight

    def counting(self):
        calls[0] += self.svd_s is not None  # a norm's "ΔW" is δ itself, nothing to build
        return original(self)

    monkeypatch.setattr(SpectralShift, "delta_weight", counting)
    return calls


@pytest.mark.parametrize("arch", ["vit", "unet"])
def test_no_grad_forward_equals_grad_forward_and_builds_once(arch, monkeypatch):
    model, inputs = _shifted(arch), make_inputs(arch)
    with torch.enable_grad():
        ref = run(model, inputs)
    calls = _count_rebuilds(monkeypatch)
    with torch.no_grad():
        first = run(model, inputs)
        built = calls[0]
        second = run(model, inputs)
    assert built > 0 and calls[0] == built  # the second forward rebuilt nothing
    torch.testing.assert_close(first, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_cache_follows_optimizer_steps_load_and_dtype():
    model, inputs = _shifted("vit"), make_inputs("vit")
    with torch.no_grad():
        before = run(model, inputs)
    # an optimizer step changes δ in place
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    run(model, inputs).square().mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after_step = run(model, inputs)
    with torch.enable_grad():
        expected = run(model, inputs).detach()
    assert not torch.allclose(after_step, before)
    torch.testing.assert_close(after_step, expected, rtol=1e-5, atol=1e-5)
    # load_state_dict back to the old δ; then another dtype
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SpectralShift):
                m.svd_delta.zero_()
        model.load_state_dict(state)
        torch.testing.assert_close(run(model, inputs), after_step, rtol=0, atol=0)
        model.double()
        torch.testing.assert_close(run(model, tuple(t.double() for t in inputs)).float(), after_step,
                                   rtol=1e-5, atol=1e-5)


def test_nested_in_lora_uses_the_cached_delta(monkeypatch):
    inputs = make_inputs("vit")
    model = pv.apply(make_model("vit"), [pv.config("lora", r=2), "svdiff"]).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SpectralShift):
                m.svd_delta.normal_(0, 0.05)
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_b" in n.lower():
                p.normal_(0, 0.05)
    with torch.enable_grad():
        ref = run(model, inputs).detach()
    with torch.no_grad():
        run(model, inputs)
        calls = _count_rebuilds(monkeypatch)
        out = run(model, inputs)
    assert calls[0] == 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
