"""One cell of the generated conformance matrix: a method variant on the tiny model of a family.

Shared by tests/test_matrix.py (every cell, as a test) and tools/matrix.py (the closing-note
table in docs/architectures.md), so the table states exactly what the tests check.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from models import ZOO, zoo_inputs, zoo_model, zoo_run
from torch import nn

import peftvision as pv
from peftvision.architectures import get_architecture
from peftvision.layers import Adapter, AdapterLayer
from peftvision.methods.sparse_layers import SparseDeltaLayer
from peftvision.registry import _REGISTRY, _ensure_builtin_methods
from peftvision.state import iter_parameters

_ensure_builtin_methods()
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
# (none today: every method is placed with no targets on every member of a family it runs on)
REFUSED_IN_FAMILY: dict[tuple[str, str], str] = {}
# mergeable methods that run on these family members but refuse merge there, with the reason
MERGE_REFUSED = {
    ("swinv2", "repadapter"): "Swin v2 has no key bias",  # k_bias is a fixed zero buffer
}


def variants():
    """(label, method class, options) of every registered method's declared variants."""
    for name, cls in sorted(_REGISTRY.items()):
        for label, options in cls.test_facts.variants.items():
            yield (f"{name}-{label}" if label else name), cls, options


def zoo_loss(out, _targets=None) -> torch.Tensor:
    """A loss for any zoo model's output (data-chosen methods take it as loss_fn)."""
    return (out.sample if hasattr(out, "sample") else out).float().square().mean()


def cell_options(family: str, cls, options: dict) -> dict:
    """The variant's options, plus one batch of the family's inputs for data-chosen methods."""
    if not cls.test_facts.needs_data:
        return dict(options)
    return {**options, "data": [(zoo_inputs(family, seed=3), None)], "loss_fn": zoo_loss}


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


def refusal_reason(error: Exception) -> str:
    """The why of an UnsupportedArchitectureError, without the model, family and module names it
    shows the user (so one reason reads the same on every family it applies to)."""
    text = str(error)
    found = re.search(r"\(architecture '[^']*'\)[:\s]*(.*?); it supports", text, re.S)
    why = (found.group(1) if found else text).strip()
    if why.startswith("with no targets ("):  # "(why). Pass targets=[...]; modules include: ..."
        why = _parenthesised(why.removeprefix("with no targets ("))
    elif why.startswith("(") and why.endswith(")"):
        why = why[1:-1]
    return why or "no placement on this family"


def _parenthesised(text: str) -> str:
    """`text` up to the ")" closing a "(" just before it."""
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return text[:i]
    return text


def check_cell(family: str, label: str, cls, options: dict, tmp_path: Path) -> tuple[str, str]:
    """("pass", "" or why merge is refused) or ("refused", why); AssertionError on a mismatch.

    Every check of DESIGN.md's conformance list, with no targets: refused cells leave the model
    untouched; identity at init where promised; the parameter-count formula; a training step
    changes only trainable parameters; save -> load onto a fresh base gives identical outputs;
    merge ≈ unmerged and unmerge restores the weights (or merge is refused, changing nothing);
    unload gives the original state dict exactly."""
    arch = get_architecture(FAMILY_ARCH[family])
    base = zoo_model(family)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    options = cell_options(family, cls, options)
    config = pv.config(cls.name, **options)
    if not cls.runs_on(arch):  # refused with a reason, nothing changed
        try:
            pv.apply(base, config)
        except pv.UnsupportedArchitectureError as exc:
            assert cls.name in str(exc), exc
            assert pv.applied(base) is None
            assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())
            return "refused", refusal_reason(exc)
        raise AssertionError(f"{cls.name} applied on {family}, which its registration refuses")
    y0 = out(base, family)
    try:
        model = pv.apply(base, copy.deepcopy(config))
    except pv.UnsupportedArchitectureError as exc:
        if label == cls.name and (family, cls.name) not in REFUSED_IN_FAMILY:
            raise
        assert pv.applied(base) is None  # a variant may need more (TSA's β: a Linear head)
        return "refused", refusal_reason(exc)
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
    # sparse deltas run the layer's own forward on p + Δp (functional_call), so they merge there
    transforming = any(type(m.weighted_layer).__name__ in WEIGHT_TRANSFORMING
                       for m in model.modules()
                       if isinstance(m, AdapterLayer) and not isinstance(m, SparseDeltaLayer))
    merge_note = ""
    if not cls.mergeable or transforming or (family, cls.name) in MERGE_REFUSED:
        try:
            pv.merge(model)
        except pv.MergeError as exc:
            assert re.search(MERGE_REFUSED.get((family, cls.name), ""), str(exc)), exc
            merge_note = str(exc)
        else:
            raise AssertionError(f"merge of {cls.name} on {family} should be refused")
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
    return "pass", merge_note


__all__ = ["FAMILY_ARCH", "ZOO", "check_cell", "variants", "refusal_reason"]
