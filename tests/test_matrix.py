"""The generated conformance matrix: method registry x architecture registry x the tiny zoo.

Every (family, method variant) cell either applies with NO targets and passes every check, or is
refused with an UnsupportedArchitectureError that leaves the model untouched. Which one is
decided by the registries (Method.runs_on), and what a method promises (identity at init,
mergeable, its parameter-count formula, its variants) by the method's own `TestFacts`, so a new
method or family needs no edit here. tests/test_conformance.py keeps the hand-written formulas
on the three original families.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import ZOO, zoo_inputs, zoo_model, zoo_run
from torch import nn

import peftvision as pv
from peftvision.architectures import get_architecture
from peftvision.layers import Adapter, AdapterLayer
from peftvision.registry import _REGISTRY, _ensure_builtin_methods
from peftvision.state import iter_parameters
from peftvision.targets import detect_architecture

_ensure_builtin_methods()
# families whose tiny model is slower to run (diffusers), marked slow past the first of each kind
SLOW = {"sdxl-unet", "flux"}
FAMILY_ARCH = {  # the registered family each zoo model must be recognised as
    **{f: "vit" for f in ("vit", "deit-distilled", "deit3", "dinov2-reg", "clip", "siglip", "vit-gap",
                          "flexivit")},
    "eva02": "eva", "eva": "eva", "beit": "beit", "sam-vit": "sam-vit", "swin": "swin", "swinv2": "swin",
    "maxvit": "maxvit", "coatnet": "maxvit", "resnet": "resnet", "seresnet": "resnet",
    "resnetv2": "resnetv2", "convnext": "convnext", "convnextv2": "convnext",
    "efficientnet": "efficientnet", "mobilenetv3": "efficientnet", "regnet": "regnet",
    "densenet": "densenet", "unet": "unet", "sdxl-unet": "unet", "unet2d": "unet2d", "dit": "dit",
    "sd3": "sd3", "flux": "flux",
}
# Layers that transform their own weight in forward (timm's StdConv2d standardises it): a merged
# weight cannot give the adapted output, so merge must refuse (issue 11 item 3).
WEIGHT_TRANSFORMING = ("StdConv2d", "ScaledStdConv2d")
# runs_on is decided per family; these members of a family refuse with a reason of their own
REFUSED_IN_FAMILY: dict[tuple[str, str], str] = {}
# mergeable methods that run on these family members but refuse merge there, with the reason
MERGE_REFUSED = {
    ("swinv2", "repadapter"): "Swin v2 has no key bias",  # k_bias is a fixed zero buffer
}


def variants():
    for name, cls in sorted(_REGISTRY.items()):
        facts = cls.test_facts
        if facts.needs_data:
            continue  # SH-PEFT / SPT: tests/test_sparse_methods.py (they choose from data)
        for label, options in facts.variants.items():
            yield (f"{name}-{label}" if label else name), cls, options


CELLS = [pytest.param(family, label, cls, options, id=f"{family}-{label}",
                      marks=[pytest.mark.slow] if family in SLOW else [])
         for family in ZOO for label, cls, options in variants()]


def out(model: nn.Module, family: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return zoo_run(model, zoo_inputs(family))


def close(a, b, tol=1e-4) -> bool:
    return torch.allclose(a, b, rtol=tol, atol=tol)


def perturb(model: nn.Module) -> None:
    """Move every adapter off its init (LoRA's B is zero), as merge tests must."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for e in iter_parameters(model):
            if e.adapter is not None:
                noise = torch.randn(e.param.shape, generator=g) * 0.05
                if e.name.endswith("tsa_beta"):
                    noise /= e.param.shape[0] ** 0.5
                e.param.add_(noise)


@pytest.mark.parametrize("family", list(ZOO))
def test_family_is_recognised(family):
    assert detect_architecture(zoo_model(family)) == FAMILY_ARCH[family]


@pytest.mark.parametrize("family,label,cls,options", CELLS)
def test_cell(family, label, cls, options, tmp_path):
    arch = get_architecture(FAMILY_ARCH[family])
    base = zoo_model(family)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    config = pv.config(cls.name, **options)
    if not cls.runs_on(arch):  # refused with a reason, nothing changed
        with pytest.raises(pv.UnsupportedArchitectureError, match=cls.name):
            pv.apply(base, config)
        assert pv.applied(base) is None
        assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())
        return
    y0 = out(base, family)
    try:
        model = pv.apply(base, copy.deepcopy(config))
    except pv.UnsupportedArchitectureError:
        if label == cls.name and (family, cls.name) not in REFUSED_IN_FAMILY:
            raise
        assert pv.applied(base) is None  # a variant may need more (TSA's β: a Linear head)
        return
    facts = cls.test_facts
    y1 = out(model, family)
    assert torch.isfinite(y1).all()
    if facts.identity_at_init:
        assert close(y0, y1, 1e-5), (y1 - y0).abs().max()

    # the parameter-count formula: adapters' own count per wrapped layer
    if facts.params_per_layer is not None:
        layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and m.method_name == cls.name]
        adapter = sum(p.numel() for m in layers for p in m.parameters()
                      if p.requires_grad and not any(p is q for q in m.weighted_layer.parameters()))
        assert adapter == sum(facts.params_per_layer(config, m) for m in layers)

    # one training step changes exactly the trainable parameters
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    y = zoo_run(model, zoo_inputs(family))
    y.float().square().mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    model.zero_grad(set_to_none=True)

    # save -> load onto a fresh base: identical outputs
    perturb(model)
    y_adapted = out(model, family)
    pv.save_adapter(model, tmp_path)
    fresh = pv.load_adapter(zoo_model(family), tmp_path)
    assert torch.equal(out(fresh, family), y_adapted)

    # merge / unmerge
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    transforming = any(type(m.weighted_layer).__name__ in WEIGHT_TRANSFORMING
                       for m in model.modules() if isinstance(m, AdapterLayer))
    if not cls.mergeable or transforming or (family, cls.name) in MERGE_REFUSED:
        with pytest.raises(pv.MergeError, match=MERGE_REFUSED.get((family, cls.name), "")):
            pv.merge(model)
        assert torch.equal(out(model, family), y_adapted)  # a refused merge changes nothing
    else:
        pv.merge(model)
        assert close(out(model, family), y_adapted), (out(model, family) - y_adapted).abs().max()
        pv.unmerge(model)
        assert close(out(model, family), y_adapted, 1e-5)
        assert all(close(p, weights[n], 1e-5) for n, p in model.named_parameters())

    # unload restores the original model exactly
    plain = pv.unload(pv.apply(zoo_model(family), copy.deepcopy(config)))
    assert not any(isinstance(m, Adapter) for m in plain.modules())
    state = plain.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)
