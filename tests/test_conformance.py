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

# name in the matrix -> what apply() gets
SPECS = {
    "full": "full", "linear": "linear", "bias": "bias", "batchnorm": "batchnorm",
    "layernorm": "layernorm", "norm": "norm", "attention": "attention",
    "lora": pv.config("lora", r=R), "ssf": "ssf", "tsa": "tsa",
    "tsa+alignment": pv.config("tsa", alignment=True), "adaptformer": "adaptformer",
    "vpt-shallow": pv.config("vpt", mode="shallow"), "vpt-deep": pv.config("vpt", mode="deep"),
    "lora+bias": [pv.config("lora", r=R), "bias"],
    "ssf+batchnorm": ["ssf", "batchnorm"],
    "bias+norm+attention": ["bias", "norm", "attention"],
    "lora+ssf": [pv.config("lora", r=R), "ssf"],  # two wrappers nest on the same qkv
    "lora+tsa": [pv.config("lora", r=R), "tsa"],  # two wrappers nest on the same convs
    "vpt+adaptformer": ["vpt", "adaptformer"],
    "adaptformer+lora": ["adaptformer", pv.config("lora", r=R)],
    "svdiff": "svdiff", "difffit": "difffit",
    "lora+svdiff": [pv.config("lora", r=R), "svdiff"],  # svdiff nests around LoRA's projections
    "difffit+lora": ["difffit", pv.config("lora", r=R)],  # LoRA nests around DiffFit's scales
}
SUPPORTED = {
    "vit": ["full", "linear", "bias", "layernorm", "norm", "attention", "lora", "ssf", "adaptformer",
            "vpt-shallow", "vpt-deep", "lora+bias", "bias+norm+attention", "lora+ssf",
            "vpt+adaptformer", "adaptformer+lora", "svdiff"],
    "resnet": ["full", "linear", "bias", "batchnorm", "norm", "lora", "ssf", "tsa", "tsa+alignment",
               "lora+bias", "ssf+batchnorm", "lora+tsa", "svdiff"],
    "unet": ["full", "bias", "layernorm", "norm", "attention", "lora", "lora+bias",
             "bias+norm+attention", "svdiff", "difffit", "lora+svdiff", "difffit+lora"],
}
UNSUPPORTED = [("vit", "batchnorm"), ("resnet", "layernorm"), ("resnet", "attention"),
               ("unet", "linear"), ("unet", "batchnorm"), ("vit", "tsa"),
               ("unet", "tsa"), ("resnet", "adaptformer"), ("unet", "adaptformer"),
               ("resnet", "vpt"), ("unet", "vpt"), ("vit", "difffit"), ("resnet", "difffit")]
# SSF's paper initialises γ ~ N(1, .02), β ~ N(0, .02); VPT's prompts are extra tokens from the start
NOT_IDENTITY_AT_INIT = {"ssf", "vpt-shallow", "vpt-deep", "lora+ssf", "ssf+batchnorm",
                        "vpt+adaptformer"}
NOT_MERGEABLE = {"adaptformer", "vpt-shallow", "vpt-deep", "vpt+adaptformer", "adaptformer+lora"}
CASES = [(arch, method) for arch, ms in SUPPORTED.items() for method in ms]


def applied(arch: str, method: str, seed: int = 0) -> nn.Module:
    return pv.apply(make_model(arch, seed), copy.deepcopy(SPECS[method]))


# ---- documented trainable-parameter formulas, computed independently of the library ---------

def _names(model, keep) -> set[str]:
    return {n for n, _ in model.named_parameters() if keep(n)}


def _module_params(model, types) -> set[str]:
    return {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, types)
            for pn, _ in m.named_parameters()}


def selected_names(arch: str, method: str, base: nn.Module) -> set[str]:
    """Base parameters a selective method trains (the head is counted separately)."""
    in_head = ("head.", "fc.")
    if method == "full":
        return _names(base, lambda n: not n.startswith(in_head))
    if method == "bias":
        return _names(base, lambda n: n.endswith(".bias") and not n.startswith(in_head))
    if method == "batchnorm":
        return _module_params(base, nn.modules.batchnorm._BatchNorm)
    if method == "layernorm":
        return _module_params(base, nn.LayerNorm)
    if method == "norm":
        return _module_params(base, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))
    if method == "attention":
        key = ".attn." if arch == "vit" else "attentions."
        return _names(base, lambda n: key in n)
    if method == "difffit":  # every bias and every norm's parameters
        return selected_names(arch, "bias", base) | selected_names(arch, "norm", base)
    return set()


def adapter_count(arch: str, method: str, base: nn.Module) -> int:
    """Parameters an additive method adds."""
    if method == "lora":
        if arch == "vit":  # fused qkv: A (r, D) + B (3D, r) per block
            return sum(R * (b.attn.qkv.in_features + b.attn.qkv.out_features) for b in base.blocks)
        if arch == "resnet":  # conv1..conv3 of each block: A (r, in, k, k) + B (out, r, 1, 1)
            return sum(R * c.in_channels * c.kernel_size[0] * c.kernel_size[1] + c.out_channels * R
                       for c in _block_convs(base))
        linears = [m for n, m in base.named_modules()
                   if n.endswith(("to_q", "to_k", "to_v", "to_out.0")) and isinstance(m, nn.Linear)]
        return sum(R * (m.in_features + m.out_features) for m in linears)
    if method == "ssf":  # γ and β per output channel of each site
        if arch == "resnet":
            return sum(2 * m.num_features for m in base.modules() if isinstance(m, nn.BatchNorm2d))
        sites = [base.patch_embed.proj.out_channels, base.norm.normalized_shape[0]]
        for b in base.blocks:
            sites += [b.norm1.normalized_shape[0], b.attn.qkv.out_features, b.attn.proj.out_features,
                      b.norm2.normalized_shape[0], b.mlp.fc1.out_features, b.mlp.fc2.out_features]
        return 2 * sum(sites)
    if method in ("tsa", "tsa+alignment"):  # α: C_out x C_in per block conv (+ β: F x F)
        alpha = sum(c.out_channels * c.in_channels for c in _block_convs(base))
        return alpha + (base.fc.in_features ** 2 if method == "tsa+alignment" else 0)
    if method == "adaptformer":  # down (D->64, bias) + up (64->D, bias) per block
        return sum(2 * 64 * b.norm2.normalized_shape[0] + 64 + b.norm2.normalized_shape[0]
                   for b in base.blocks)
    if method == "svdiff":  # one δ per singular value of each Linear/Conv, one per norm weight
        count = 0
        for name, m in base.named_modules():
            if name in ("head", "fc"):  # the classifier trains fully, unshifted
                continue
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                count += min(m.weight.shape[0], m.weight[0].numel())  # C_out x (C_in/g * k * k)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                count += m.weight.numel()
        return count
    if method == "difffit":  # γ on attn1/attn2/ff outputs (dim) and on each q/k/v/out projection
        count = 0
        for m in base.modules():
            if type(m).__name__ == "BasicTransformerBlock":
                attns = [a for a in (m.attn1, m.attn2) if a is not None]
                count += m.dim * (len(attns) + 1)
                count += sum(a.to_q.out_features + a.to_k.out_features + a.to_v.out_features
                             + a.to_out[0].out_features for a in attns)
        return count
    if method == "vpt-shallow":
        return 5 * base.embed_dim
    if method in ("vpt-deep", "vpt"):  # deep is the default mode
        return 10 * base.embed_dim * len(base.blocks)
    return 0


def _block_convs(base):
    return [m for stage in (base.layer1, base.layer2, base.layer3, base.layer4)
            for block in stage for name, m in block.named_children() if name.startswith("conv")]


def expected_trainable(arch: str, method: str, base: nn.Module) -> int:
    parts = method.split("+") if isinstance(SPECS[method], list) else [method]
    params = dict(base.named_parameters())
    head = set() if arch == "unet" else _names(base, lambda n: n.startswith(("head.", "fc.")))
    selected = set().union(*(selected_names(arch, p, base) for p in parts))
    return (sum(params[n].numel() for n in selected | head)
            + sum(adapter_count(arch, p, base) for p in parts))


def randomize_adapters(model: nn.Module, scale: float = 0.1) -> None:
    """Make every adapter non-identity (LoRA's B starts at zero), as merge tests must."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for e in iter_parameters(model):
            if e.adapter is not None:
                noise = torch.randn(e.param.shape, generator=g) * scale
                if e.name.endswith("tsa_beta"):  # keep the F x F alignment well conditioned
                    noise /= e.param.shape[0] ** 0.5
                e.param.add_(noise)


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
    y1 = outputs(pv.apply(base, copy.deepcopy(SPECS[method])), arch)
    if method in NOT_IDENTITY_AT_INIT:
        assert not torch.equal(y0, y1)
        if method == "ssf":  # the paper's random init; with zero spread it is exact
            exact = outputs(pv.apply(make_model(arch), "ssf", init_std=0.0), arch)
            assert close(y0, exact), (exact - y0).abs().max()
    else:
        # the conv-bias fast path adds the bias after the conv: fp32 rounding only
        assert close(y0, y1, rtol=1e-5, atol=1e-5), (y1 - y0).abs().max()


@pytest.mark.parametrize("arch,method", CASES)
def test_trainable_set_and_count(arch, method):
    base = make_model(arch)
    expected = expected_trainable(arch, method, base)
    model = pv.apply(copy.deepcopy(base), copy.deepcopy(SPECS[method]))
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
    if method in NOT_MERGEABLE:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(pv.MergeError, match="cannot merge"):
            pv.merge(model)
        with pytest.raises(pv.MergeError, match="merge=False"):
            pv.unload(model, merge=True)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
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
    model = pv.unload(pv.apply(base, copy.deepcopy(SPECS[method])))
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert [type(m) for m in model.modules()] == types
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(isinstance(m, Adapter) for m in model.modules())


@pytest.mark.parametrize("arch,method", CASES)
def test_unload_merged_is_plain_model_with_same_outputs(arch, method):
    if method in NOT_MERGEABLE:
        pytest.skip("not mergeable: test_merge_unmerge_roundtrip checks the refusal")
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
    assert pv.applied(model) is None


def test_methods_table_matches_matrix():
    info = pv.methods()
    for arch, names in SUPPORTED.items():
        for name in names:
            for part in (name.split("+") if name != "tsa+alignment" else ["tsa"]):
                assert arch in info[part.split("-")[0]].architectures
    for arch, name in UNSUPPORTED:
        assert arch not in info[name].architectures
