"""The conformance matrix of DESIGN.md: every method x every tiny architecture it supports."""

from __future__ import annotations

import copy

import pytest
import torch
from models import loss_fn, make_inputs, make_model, make_target, run
from torch import nn

import peftvision as pv
from peftvision.layers import Adapter
from peftvision.state import iter_parameters

R = 4  # LoRA rank used in the matrix

SUPPORTED = {
    "vit": ["full", "linear", "bias", "layernorm", "norm", "attention", "lora", "ssf"],
    "resnet": ["full", "linear", "bias", "batchnorm", "norm", "lora", "ssf"],
    "unet": ["full", "bias", "layernorm", "norm", "attention", "lora"],
}
UNSUPPORTED = [("vit", "batchnorm"), ("resnet", "layernorm"), ("resnet", "attention"),
               ("unet", "linear"), ("unet", "batchnorm"), ("unet", "ssf")]
NOT_IDENTITY_AT_INIT = {"ssf"}  # SSF's paper initialises γ ~ N(1, .02), β ~ N(0, .02)
CASES = [(arch, method) for arch, ms in SUPPORTED.items() for method in ms]
CFG = {"lora": {"r": R}}


def applied(arch: str, method: str, seed: int = 0) -> nn.Module:
    return pv.apply(make_model(arch, seed), method, **CFG.get(method, {}))


# ---- documented trainable-parameter formulas, computed independently of the library ---------

def _numel(model, keep) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if keep(n))


def _modules(model, types):
    return [m for m in model.modules() if isinstance(m, types)]


def expected_trainable(arch: str, method: str, base: nn.Module) -> int:
    head = _numel(base, lambda n: n.startswith("head.") or n.startswith("fc.")) if arch != "unet" else 0
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    if method == "full":
        return _numel(base, lambda n: True)
    if method == "linear":
        return head
    if method == "bias":
        return head + _numel(base, lambda n: n.endswith(".bias") and not n.startswith(("head.", "fc.")))
    if method in ("batchnorm", "layernorm", "norm"):
        types = {"batchnorm": nn.modules.batchnorm._BatchNorm, "layernorm": nn.LayerNorm,
                 "norm": norms}[method]
        return head + sum(p.numel() for m in _modules(base, types) for p in m.parameters())
    if method == "attention":
        key = ".attn." if arch == "vit" else "attentions."
        return head + _numel(base, lambda n: key in n)
    if method == "lora":
        if arch == "vit":  # fused qkv: A (r, D) + B (3D, r) per block
            return head + sum(R * (b.attn.qkv.in_features + b.attn.qkv.out_features) for b in base.blocks)
        if arch == "resnet":  # conv1..conv3 of each block: A (r, in, k, k) + B (out, r, 1, 1)
            convs = [m for stage in (base.layer1, base.layer2, base.layer3, base.layer4)
                     for block in stage for name, m in block.named_children() if name.startswith("conv")]
            return head + sum(R * c.in_channels * c.kernel_size[0] * c.kernel_size[1] + c.out_channels * R
                              for c in convs)
        linears = [m for n, m in base.named_modules()
                   if n.endswith(("to_q", "to_k", "to_v", "to_out.0")) and isinstance(m, nn.Linear)]
        return sum(R * (m.in_features + m.out_features) for m in linears)
    if method == "ssf":  # γ and β per output channel of each site
        if arch == "resnet":
            return head + sum(2 * m.num_features for m in _modules(base, nn.BatchNorm2d))
        sites = [base.patch_embed.proj.out_channels, base.norm.normalized_shape[0]]
        for b in base.blocks:
            sites += [b.norm1.normalized_shape[0], b.attn.qkv.out_features, b.attn.proj.out_features,
                      b.norm2.normalized_shape[0], b.mlp.fc1.out_features, b.mlp.fc2.out_features]
        return head + 2 * sum(sites)
    raise AssertionError(method)


def randomize_adapters(model: nn.Module, scale: float = 0.1) -> None:
    """Make every adapter non-identity (LoRA's B starts at zero), as merge tests must."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for e in iter_parameters(model):
            if e.adapter is not None:
                e.param.add_(torch.randn(e.param.shape, generator=g) * scale)


def outputs(model: nn.Module, arch: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return run(model, make_inputs(arch))


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> bool:
    return torch.allclose(a, b, rtol=rtol, atol=atol)


# ---- the matrix ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,method", CASES)
def test_identity_at_init(arch, method):
    base = make_model(arch)
    y0 = outputs(base, arch)
    y1 = outputs(pv.apply(base, method, **CFG.get(method, {})), arch)
    if method in NOT_IDENTITY_AT_INIT:
        assert not torch.equal(y0, y1)  # the paper's random init; with zero spread it is exact:
        exact = outputs(pv.apply(make_model(arch), method, init_std=0.0), arch)
        assert close(y0, exact), (exact - y0).abs().max()
    else:
        # the conv-bias fast path adds the bias after the conv: fp32 rounding only
        assert close(y0, y1, rtol=1e-5, atol=1e-5), (y1 - y0).abs().max()


@pytest.mark.parametrize("arch,method", CASES)
def test_trainable_set_and_count(arch, method):
    base = make_model(arch)
    expected = expected_trainable(arch, method, base)
    model = pv.apply(copy.deepcopy(base), method, **CFG.get(method, {}))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    rep = pv.report(model)
    assert rep.trainable == expected
    assert sum(rep.by_method.values()) == expected
    assert sum(rep.by_module_type.values()) == expected
    # adapter parameters all train, and every trainable base parameter was selected on purpose
    for e in iter_parameters(model):
        if e.adapter is not None:
            assert e.param.requires_grad, e.name


@pytest.mark.parametrize("arch,method", CASES)
def test_training_step_changes_only_trainable(arch, method):
    model = applied(arch, method).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = make_inputs(arch)
    out = run(model, inputs)
    loss_fn(arch, out, make_target(arch, out)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad <= trainable
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert changed == with_grad  # everything that got a gradient moved
    assert changed


@pytest.mark.parametrize("arch,method", CASES)
def test_merge_unmerge_roundtrip(arch, method):
    model = applied(arch, method)
    randomize_adapters(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = outputs(model, arch)
    pv.merge(model)
    merged = outputs(model, arch)
    pv.unmerge(model)
    again = outputs(model, arch)
    assert close(unmerged, merged, rtol=1e-4, atol=1e-5), (unmerged - merged).abs().max()
    assert close(unmerged, again), (unmerged - again).abs().max()
    for n, p in model.named_parameters():
        assert close(p, weights[n], rtol=1e-5, atol=1e-6), n


@pytest.mark.parametrize("arch,method", CASES)
def test_save_load_identical(arch, method, tmp_path):
    model = applied(arch, method).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # train mode: BatchNorm statistics move too
        out = run(model, make_inputs(arch))
        loss_fn(arch, out, make_target(arch, out)).backward()
        opt.step()
        opt.zero_grad()
    randomize_adapters(model, 0.05)
    pv.save_adapter(model, tmp_path)
    fresh = pv.load_adapter(make_model(arch), tmp_path)
    assert torch.equal(outputs(model, arch), outputs(fresh, arch))


@pytest.mark.parametrize("arch,method", CASES)
def test_unload_restores_original_exactly(arch, method):
    base = make_model(arch)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    types = [type(m) for m in base.modules()]
    flags = [p.requires_grad for p in base.parameters()]
    model = pv.unload(pv.apply(base, method, **CFG.get(method, {})))
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert [type(m) for m in model.modules()] == types
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(isinstance(m, Adapter) for m in model.modules())


@pytest.mark.parametrize("arch,method", CASES)
def test_unload_merged_is_plain_model_with_same_outputs(arch, method):
    model = applied(arch, method)
    randomize_adapters(model)
    y = outputs(model, arch)
    plain = pv.unload(model, merge=True)
    assert not any(isinstance(m, Adapter) for m in plain.modules())
    assert close(outputs(plain, arch), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,method", UNSUPPORTED)
def test_unsupported_pairs_raise(arch, method):
    model = make_model(arch)
    with pytest.raises(pv.UnsupportedArchitectureError, match=method):
        pv.apply(model, method)
    assert not hasattr(model, "_peftvision_state")


def test_methods_table_matches_matrix():
    info = pv.methods()
    for arch, names in SUPPORTED.items():
        for name in names:
            assert arch in info[name].architectures
    for arch, name in UNSUPPORTED:
        assert arch not in info[name].architectures
