"""The LoRA family beside plain LoRA: DoRA, rsLoRA, LoRA initialisations (gaussian, PiSSA, OLoRA),
LoHa, LoKr and OFT.

1. The conformance checks of DESIGN.md on the tiny ViT, ResNet and UNet (identity at init,
   trainable count from an independent formula, merge, save -> load, unload).
2. Property tests over layer shapes: merged weights equal a float64 reference built here from
   the adapter's parameters (never from the library's `delta_weight`), using the merge-cycle
   checks of test_merge_properties.py (tolerances explained there).
3. Outputs equal Hugging Face peft's where the parameter layouts match.
4. Trainable counts on full-size ViT-B/16 and ResNet-50, built on the meta device.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import loss_fn, make_inputs, make_model, make_target, run
from test_merge_properties import PROPS, assert_scaled_close, check_cycle, snapshot, wrapped
from torch import nn

import peftvision as pv
from peftvision.layers import Adapter
from peftvision.state import iter_parameters

R = 4
SPECS = {
    "dora": pv.config("dora", r=R),
    "lora-rslora": pv.config("lora", r=R, alpha=8, use_rslora=True),
    "lora-gaussian": pv.config("lora", r=R, init="gaussian"),
    "lora-pissa": pv.config("lora", r=R, init="pissa"),
    "lora-olora": pv.config("lora", r=R, init="olora"),
    "dora-pissa": pv.config("dora", r=R, init="pissa"),
    "loha": pv.config("loha", r=R),
    "lokr": pv.config("lokr", r=R),
    "lokr-both": pv.config("lokr", r=1, decompose_both=True),
    "oft": pv.config("oft", block_size=8),
}
ARCHS = ("vit", "resnet", "unet")
CASES = [(arch, name) for arch in ARCHS for name in SPECS]


def applied(arch: str, name: str) -> nn.Module:
    return pv.apply(make_model(arch), copy.deepcopy(SPECS[name]))


def outputs(model: nn.Module, arch: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return run(model, make_inputs(arch))


def randomize_adapters(model: nn.Module, scale: float = 0.1) -> None:
    """Every adapter parameter moved away from its init (B, W2b, W1 and Q start at zero)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for e in iter_parameters(model):
            if e.adapter is not None:
                e.param.add_(torch.randn(e.param.shape, generator=g) * scale)


def assert_outputs_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """fp32 ≤ 1e-5 relative, measured against the largest output (outputs near 0 cancel)."""
    assert_scaled_close(actual, expected, rtol=rtol)


# ---- trainable counts from the layer shapes (independent of the library) ---------------------

def targeted(arch: str, base: nn.Module) -> list[nn.Module]:
    """The modules the LoRA-family presets adapt: ViT qkv, ResNet block convs, UNet attention
    projections."""
    if arch == "vit":
        return [b.attn.qkv for b in base.blocks]
    if arch == "resnet":
        return [m for stage in (base.layer1, base.layer2, base.layer3, base.layer4) for block in stage
                for name, m in block.named_children() if name.startswith("conv")]
    return [m for n, m in base.named_modules()
            if n.endswith(("to_q", "to_k", "to_v", "to_out.0")) and isinstance(m, nn.Linear)]


def _lokr_split(dim: int) -> tuple[int, int]:
    from peft.tuners.lokr.layer import factorization  # the reference rule

    return factorization(dim, -1)


def layer_count(name: str, weight_shape: torch.Size) -> int:
    out, fan_in = weight_shape[0], math.prod(weight_shape[1:])  # fan_in = in/g · k·k
    cin, kernel = weight_shape[1], math.prod(weight_shape[2:])
    method = name.split("-")[0]
    if method == "lora":
        return R * (fan_in + out)
    if method == "dora":
        return R * (fan_in + out) + out  # + one magnitude per output
    if method == "loha":
        return 2 * R * (out + fan_in)
    if method == "lokr":
        r = 1 if name == "lokr-both" else R
        (a, b), (c, d) = _lokr_split(out), _lokr_split(cin)
        w1 = r * (a + c) if name == "lokr-both" and r < max(a, c) / 2 else a * c
        w2 = r * (b + d * kernel) if r < max(b, d) / 2 else b * d * kernel
        return w1 + w2
    if method == "oft":
        size = max(s for s in range(1, 9) if fan_in % s == 0)
        return fan_in // size * size * (size - 1) // 2
    raise AssertionError(name)


def expected_trainable(arch: str, name: str, base: nn.Module) -> int:
    head = 0 if arch == "unet" else sum(p.numel() for p in base.get_classifier().parameters())
    return head + sum(layer_count(name, m.weight.shape) for m in targeted(arch, base))


# ---- 1. the conformance checks ---------------------------------------------------------------

@pytest.mark.parametrize("arch,name", CASES)
def test_identity_at_init(arch, name):
    base = make_model(arch)
    y0 = outputs(base, arch)
    y1 = outputs(pv.apply(base, copy.deepcopy(SPECS[name])), arch)
    # DoRA, PiSSA, OLoRA: exactly the base output (equal terms cancel); OFT: R = I exactly
    assert_outputs_close(y1, y0)


@pytest.mark.parametrize("arch,name", CASES)
def test_trainable_count(arch, name):
    base = make_model(arch)
    expected = expected_trainable(arch, name, base)
    model = pv.apply(copy.deepcopy(base), copy.deepcopy(SPECS[name]))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    rep = pv.report(model)
    assert rep.trainable == expected
    assert rep.by_method[SPECS[name].name] == expected - rep.by_method.get("head", 0)


@pytest.mark.parametrize("arch,name", CASES)
def test_training_step_changes_only_trainable(arch, name):
    model = applied(arch, name).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out = run(model, make_inputs(arch))
    loss_fn(arch, out, make_target(arch, out)).backward()
    # at init some factors get no gradient (LoHa's W1·W2a while W2b = 0, LoKr's W2 while W1 = 0)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad <= trainable
    adapter_params = {e.name for e in iter_parameters(model) if e.adapter is not None}
    assert with_grad & adapter_params, "no adapter parameter got a gradient"
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == with_grad


@pytest.mark.parametrize("arch,name", CASES)
def test_merge_unmerge_and_unload_merged(arch, name):
    model = applied(arch, name)
    randomize_adapters(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = outputs(model, arch)
    assert not torch.allclose(unmerged, outputs(make_model(arch), arch), atol=1e-4)  # non-identity
    pv.merge(model)
    assert_outputs_close(outputs(model, arch), unmerged)
    pv.unmerge(model)
    assert_outputs_close(outputs(model, arch), unmerged)
    for n, p in model.named_parameters():
        assert_scaled_close(p.detach(), weights[n])
    plain = pv.unload(model, merge=True)
    assert not any(isinstance(m, Adapter) for m in plain.modules())
    assert_outputs_close(outputs(plain, arch), unmerged)


@pytest.mark.parametrize("arch,name", CASES)
def test_save_load_identical(arch, name, tmp_path):
    model = applied(arch, name)
    randomize_adapters(model)
    pv.save_adapter(model, tmp_path)
    fresh = pv.load_adapter(make_model(arch), tmp_path)
    assert torch.equal(outputs(model, arch), outputs(fresh, arch))


@pytest.mark.parametrize("arch,name", CASES)
def test_unload_restores_original_exactly(arch, name):
    base = make_model(arch)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    types = [type(m) for m in base.modules()]
    flags = [p.requires_grad for p in base.parameters()]
    model = pv.apply(base, copy.deepcopy(SPECS[name]))
    randomize_adapters(model)  # a trained adapter; PiSSA / OLoRA never rewrote the base weights
    model = pv.unload(model)
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert [type(m) for m in model.modules()] == types
    assert [p.requires_grad for p in model.parameters()] == flags


# ---- 2. property tests over shapes -----------------------------------------------------------

def _lin_case(in_f, out_f, bias, seed):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias), torch.randn(3, in_f)


@st.composite
def conv_cases(draw):
    g = draw(st.sampled_from([1, 2]))
    cin, cout = g * draw(st.integers(1, 4)), g * draw(st.integers(1, 4))
    k = draw(st.sampled_from([1, 2, 3]))
    stride, dilation = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    mode = draw(st.sampled_from(["zeros", "reflect", "circular"]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, dilation=dilation, groups=g,
                     bias=draw(st.booleans()), padding_mode=mode)
    size = dilation * (k - 1) + 2 + draw(st.integers(0, 3))
    return conv, torch.randn(2, cin, size, size + 1)


def _reference_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base layer's op in float64 with `weight` (padding modes through the layer's own code)."""
    ref = copy.deepcopy(layer).double()
    with torch.no_grad():
        ref.weight.copy_(weight)
    return ref(x.double())


def _cycle(model, adapter, layer, x, before, merged_weight):
    expected = _reference_output(layer, x, merged_weight)
    check_cycle(model, adapter, x, expected, before, merged_weight=merged_weight,
                merged_bias=before["bias"])


def _randomised(adapter, scale=0.5):
    with torch.no_grad():
        for p in adapter.parameters(recurse=False):
            p.add_(torch.randn_like(p) * scale)
    return {n: p.detach().double() for n, p in adapter.named_parameters(recurse=False)}


def _lora_delta(p, out: int, groups: int) -> torch.Tensor:
    """ΔW / s, (out, in/g·k·k): output o of group j mixes A's rows j·r .. j·r + r - 1."""
    a, b = p["lora_A"].flatten(1), p["lora_B"].flatten(1)  # (g·r, in/g·k·k), (out, r)
    r = b.shape[1]
    rows = [b[o] @ a[(o // (out // groups)) * r:(o // (out // groups) + 1) * r] for o in range(out)]
    return torch.stack(rows)


def _dora_reference(w0, p, scaling, groups=1):
    adapted = w0.flatten(1) + scaling * _lora_delta(p, w0.shape[0], groups)
    return (p["lora_magnitude"][:, None] * adapted / adapted.norm(dim=1, keepdim=True)).reshape(w0.shape)


@PROPS
@given(in_f=st.integers(1, 16), out_f=st.integers(1, 16), r=st.integers(1, 4),
       alpha=st.floats(0.5, 16.0), rslora=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_dora_linear_merge_exact(in_f, out_f, r, alpha, rslora, bias, seed):
    lin, x = _lin_case(in_f, out_f, bias, seed)
    before = snapshot(lin)
    model, adapter = wrapped(lin, "dora", r=r, alpha=alpha, use_rslora=rslora)
    p = _randomised(adapter)
    scaling = alpha / (math.sqrt(r) if rslora else r)
    _cycle(model, adapter, lin, x, before, _dora_reference(before["weight"].double(), p, scaling))


@PROPS
@given(case=conv_cases(), r=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_dora_conv2d_merge_exact(case, r, seed):
    conv, x = case
    before = snapshot(conv)
    model, adapter = wrapped(conv, "dora", r=r)
    torch.manual_seed(seed)
    p = _randomised(adapter)
    merged = _dora_reference(before["weight"].double(), p, 1.0, conv.groups)
    _cycle(model, adapter, conv, x, before, merged)


def _loha_reference(w0, p, scaling):
    w1 = p["hada_w1_a"] @ p["hada_w1_b"]
    w2 = p["hada_w2_a"] @ p["hada_w2_b"]
    return w0 + (scaling * w1 * w2).reshape(w0.shape)


def _lokr_reference(w0, p, scaling):
    """ΔW[i·b + u, j·n + v] = W1[i, j]·W2[u, v], written out with einsum rather than torch.kron."""
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]  # (a, c)
    w2 = p["lokr_w2"].flatten(1) if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]  # (b, n)
    (a, c), (b, n) = w1.shape, w2.shape
    delta = torch.einsum("ij,uv->iujv", w1, w2).reshape(a * b, c * n)
    return w0 + scaling * delta.reshape(w0.shape)


def _oft_reference(w0, p):
    """W0·Rᵀ with R = blockdiag((I - Q_i)(I + Q_i)⁻¹), built densely in float64."""
    vec = p["oft_R"]  # (blocks, b(b-1)/2)
    blocks = vec.shape[0]
    size = w0[0].numel() // blocks
    rot = []
    for v in vec:
        q = torch.zeros(size, size, dtype=torch.float64)
        q[tuple(torch.triu_indices(size, size, 1))] = v
        q = q - q.T
        eye = torch.eye(size, dtype=torch.float64)
        rot.append((eye - q) @ torch.linalg.inv(eye + q))
    full = torch.block_diag(*rot)  # (in·k·k, in·k·k)
    assert torch.allclose(full @ full.T, torch.eye(full.shape[0], dtype=torch.float64), atol=1e-10)
    return (w0.flatten(1) @ full.T).reshape(w0.shape)


@PROPS
@given(method=st.sampled_from(["loha", "lokr", "lokr-both", "oft"]), in_f=st.integers(2, 16),
       out_f=st.integers(1, 16), r=st.integers(1, 6), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_loha_lokr_oft_linear_merge_exact(method, in_f, out_f, r, bias, seed):
    lin, x = _lin_case(in_f, out_f, bias, seed)
    before = snapshot(lin)
    cfg = {"oft": dict(block_size=r + 1), "lokr-both": dict(r=r, decompose_both=True)}.get(method, dict(r=r))
    model, adapter = wrapped(lin, method.split("-")[0], **cfg)
    p = _randomised(adapter, scale=0.3)
    w0 = before["weight"].double()
    merged = {"loha": lambda: _loha_reference(w0, p, 1.0), "oft": lambda: _oft_reference(w0, p)}.get(
        method, lambda: _lokr_reference(w0, p, 1.0))()
    _cycle(model, adapter, lin, x, before, merged)


@PROPS
@given(method=st.sampled_from(["loha", "lokr", "oft"]), case=conv_cases(), r=st.integers(1, 4))
def test_loha_lokr_oft_conv2d_merge_exact(method, case, r):
    conv, x = case
    before = snapshot(conv)
    cfg = dict(block_size=r + 1) if method == "oft" else dict(r=r, alpha=2.0)
    model, adapter = wrapped(conv, method, **cfg)
    p = _randomised(adapter, scale=0.3)
    w0 = before["weight"].double()
    merged = {"loha": lambda: _loha_reference(w0, p, 2.0 / r), "oft": lambda: _oft_reference(w0, p),
              "lokr": lambda: _lokr_reference(w0, p, 2.0 / r)}[method]()
    _cycle(model, adapter, conv, x, before, merged)


@pytest.mark.parametrize("method", ["dora", "loha", "lokr", "oft"])
@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_conv3d_merge_exact(method, dims):
    torch.manual_seed(dims)
    conv = (nn.Conv1d if dims == 1 else nn.Conv3d)(4, 6, 3, padding=1, groups=2)
    x = torch.randn(2, 4, *([5] * dims))
    before = snapshot(conv)
    model, adapter = wrapped(conv, method, **(dict(block_size=3) if method == "oft" else dict(r=2)))
    p = _randomised(adapter, scale=0.3)
    w0 = before["weight"].double()
    merged = {"dora": lambda: _dora_reference(w0, p, 1.0, groups=2), "loha": lambda: _loha_reference(w0, p, 1.0),
              "lokr": lambda: _lokr_reference(w0, p, 1.0), "oft": lambda: _oft_reference(w0, p)}[method]()
    _cycle(model, adapter, conv, x, before, merged)


@PROPS
@given(init=st.sampled_from(["pissa", "olora"]), in_f=st.integers(2, 12), out_f=st.integers(2, 12),
       r=st.integers(1, 4), alpha=st.floats(0.5, 16.0), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_pissa_olora_linear_init_and_merge_exact(init, in_f, out_f, r, alpha, bias, seed):
    r = min(r, in_f, out_f)
    lin, x = _lin_case(in_f, out_f, bias, seed)
    before = snapshot(lin)
    model, adapter = wrapped(lin, "lora", r=r, alpha=alpha, init=init)
    w0, scaling = before["weight"].double(), alpha / r
    a0, b0 = adapter.lora_A.detach().double(), adapter.lora_B.detach().double()
    if init == "pissa":  # s·B0·A0 is the best rank-r approximation of W0 (Eckart-Young)
        u, sv, vh = torch.linalg.svd(w0)
        assert_scaled_close(scaling * b0 @ a0, u[:, :r] * sv[:r] @ vh[:r], rtol=1e-5)
        assert torch.allclose(b0.T @ b0 * scaling, torch.diag(sv[:r]), rtol=1e-4, atol=1e-5)
    else:  # B0 has orthonormal columns and A0 is upper triangular (QR)
        assert torch.allclose(b0.T @ b0, torch.eye(r, dtype=torch.float64), atol=1e-5)
        assert torch.equal(a0[:, :r], torch.triu(a0[:, :r]))
    p = _randomised(adapter, scale=0.3)
    merged = w0 + scaling * (p["lora_B"] @ p["lora_A"] - b0 @ a0)
    _cycle(model, adapter, lin, x, before, merged)


def test_gaussian_init_draws_a_from_n_0_1_over_r():
    torch.manual_seed(0)
    _, adapter = wrapped(nn.Linear(4000, 8), "lora", r=4, init="gaussian")
    a = adapter.lora_A.detach()
    assert abs(float(a.std()) - 1 / 4) < 0.005 and abs(float(a.mean())) < 0.005
    assert not adapter.lora_B.any()


def test_rslora_scales_by_alpha_over_sqrt_r():
    _, plain = wrapped(nn.Linear(8, 8), "lora", r=16, alpha=8)
    _, rs = wrapped(nn.Linear(8, 8), "lora", r=16, alpha=8, use_rslora=True)
    assert plain.scaling == 0.5 and rs.scaling == 2.0


def test_oft_keeps_the_angles_between_neurons():
    torch.manual_seed(0)
    lin = nn.Linear(12, 6)
    w0 = lin.weight.detach().clone()
    model, adapter = wrapped(lin, "oft", block_size=4)
    _randomised(adapter)
    pv.merge(model)
    # W·Rᵀ with R orthogonal: every inner product between neurons (rows) is kept
    assert_scaled_close(lin.weight @ lin.weight.T, w0 @ w0.T)
    assert not torch.allclose(lin.weight, w0, atol=1e-3)


# ---- options and errors ----------------------------------------------------------------------

def test_dora_is_lora_with_use_dora():
    a = pv.apply(make_model("vit"), "dora", r=R)
    b = pv.apply(make_model("vit"), "lora", r=R, use_dora=True)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    randomize_adapters(a)
    randomize_adapters(b)
    assert torch.equal(outputs(a, "vit"), outputs(b, "vit"))
    with pytest.raises(pv.ConfigError, match="use_dora"):
        pv.config("dora", use_dora=False)


@pytest.mark.parametrize("cfg,match", [
    (dict(init="loftq"), "init must be one of"),
    (dict(use_dora=True, qkv_parts="qv"), "qkv_parts"),
    (dict(use_rslora="yes"), "use_rslora"),
])
def test_lora_option_errors(cfg, match):
    with pytest.raises(pv.ConfigError, match=match):
        pv.config("lora", **cfg)


@pytest.mark.parametrize("method,cfg,match", [
    ("lora", dict(init="pissa", qkv_parts="qv"), "qkv_parts"),
    ("lora", dict(init="pissa", r=40), "r <= min"),
    ("dora", dict(), "apply dora first"),
    ("oft", dict(), "apply oft first"),
])
def test_refusals_leave_the_model_as_it_was(method, cfg, match):
    model = make_model("vit")
    if method in ("dora", "oft"):  # another adapter already wraps qkv
        pv.apply(model, "ssf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(pv.ConfigError, match=match):
        pv.apply(model, method, **cfg)
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_methods_table_lists_the_family():
    info = pv.methods()
    for name in ("dora", "loha", "lokr", "oft"):
        assert info[name].mergeable and info[name].paper
        assert set(ARCHS) <= set(info[name].architectures)


# ---- 3. against Hugging Face peft ------------------------------------------------------------

class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 10)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x, z):
        return torch.cat([self.lin(x).flatten(), self.conv(z).flatten()])


PEFT_CASES = {  # ours -> (peft config class, its options, our parameter name -> peft's)
    "rslora": (dict(method="lora", r=2, alpha=4, use_rslora=True),
               ("LoraConfig", dict(r=2, lora_alpha=4, use_rslora=True)), {}),
    "dora": (dict(method="dora", r=2, alpha=4), ("LoraConfig", dict(r=2, lora_alpha=4, use_dora=True)),
             {"lora_magnitude": "lora_magnitude_vector"}),
    # train mode with dropout: one mask shared by both terms of DoRA's adapted path
    "dora-dropout": (dict(method="dora", r=2, alpha=4, dropout=0.5),
                     ("LoraConfig", dict(r=2, lora_alpha=4, use_dora=True, lora_dropout=0.5)),
                     {"lora_magnitude": "lora_magnitude_vector"}),
    "loha": (dict(method="loha", r=2, alpha=4), ("LoHaConfig", dict(r=2, alpha=4)), {}),
    "lokr": (dict(method="lokr", r=2, alpha=4), ("LoKrConfig", dict(r=2, alpha=4)), {}),
    "lokr-both": (dict(method="lokr", r=1, alpha=3, decompose_both=True),
                  ("LoKrConfig", dict(r=1, alpha=3, decompose_both=True)), {}),
    # peft's conv OFT rotates unfolded input patches, which is not a weight rotation: Linear only
    "oft": (dict(method="oft", block_size=4, targets=["lin"]),
            ("OFTConfig", dict(oft_block_size=4, r=0, use_cayley_neumann=False, target_modules=["lin"])), {}),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_outputs_equal_peft(case):
    peft = pytest.importorskip("peft")
    ours_cfg, (peft_cls, peft_kw), renames = PEFT_CASES[case]
    torch.manual_seed(0)
    base = Pair()
    ours_cfg = {"targets": ["lin", "conv"], **ours_cfg}
    ours = pv.apply(copy.deepcopy(base), ours_cfg.pop("method"), **ours_cfg)
    theirs = peft.get_peft_model(copy.deepcopy(base),
                                 getattr(peft, peft_cls)(**{"target_modules": ["lin", "conv"], **peft_kw}))
    params = dict(theirs.named_parameters())
    randomize_adapters(ours)
    pairs = []
    with torch.no_grad():
        for e in iter_parameters(ours):
            if e.adapter is None or not e.param.requires_grad:
                continue
            module, _, pname = e.canonical.rpartition(".")
            key = f"base_model.model.{module}.{renames.get(pname, pname)}.default"
            key = key if key in params else f"{key}.weight"  # peft's ParameterDict or sub-module
            params[key].copy_(e.param.reshape(params[key].shape))
            pairs.append((e.param, params[key]))
    assert len(pairs) == sum(1 for n, p in theirs.named_parameters() if p.requires_grad)
    x, z = torch.randn(3, 12), torch.randn(2, 4, 5, 5)
    torch.manual_seed(1)  # the same dropout masks (the only random draws in the forward)
    y_ours = ours(x, z)
    torch.manual_seed(1)
    y_theirs = theirs(x, z)
    assert_outputs_close(y_ours.detach(), y_theirs.detach())
    # the same gradients too: DoRA's norm is a constant in both (paper section 4.3)
    (y_ours ** 2).sum().backward()
    (y_theirs ** 2).sum().backward()
    for mine, their in pairs:
        assert_outputs_close(mine.grad.reshape(their.shape), their.grad, rtol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_init_equals_peft(init):
    """peft has PiSSA / OLoRA for Linear only (conv weights are our flattened extension)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10))
    ours = pv.apply(copy.deepcopy(base), "lora", r=3, alpha=6, init=init, targets=["0"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=3, lora_alpha=6, init_lora_weights=init, target_modules=["0"]))
    layer = theirs.base_model.model[0]
    pairs = [(ours[0].lora_A, layer.lora_A["default"].weight), (ours[0].lora_B, layer.lora_B["default"].weight)]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mine, their in pairs:  # the same factors (peft subtracts s·B0·A0 from W0 instead) ...
            torch.testing.assert_close(mine, their)
            step = torch.randn(mine.shape, generator=g) * 0.1  # ... and after the same update
            mine.add_(step)
            their.add_(step)
        x = torch.randn(3, 12)
        assert_outputs_close(ours(x), theirs(x))


def test_rslora_round_trips_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = pv.apply(make_model("vit"), "lora", r=4, alpha=8, use_rslora=True)
    randomize_adapters(model)
    pv.save_adapter(model, tmp_path / "ours", format="peft")
    theirs = peft.PeftModel.from_pretrained(make_model("vit"), tmp_path / "ours")
    assert_outputs_close(outputs(theirs, "vit"), outputs(model, "vit"))
    theirs.save_pretrained(tmp_path / "theirs")
    back = pv.load_adapter(make_model("vit"), tmp_path / "theirs")
    assert_outputs_close(outputs(back, "vit"), outputs(model, "vit"))


@pytest.mark.parametrize("cfg", [dict(use_dora=True), dict(init="pissa")])
def test_peft_format_holds_dora_and_principal_inits(cfg, tmp_path):
    # DoRA saves as peft's DoRA; PiSSA/OLoRA as a rank-2r peft LoRA relative to the original W
    # (tests/test_peft_interop.py covers each peft type both ways)
    peft = pytest.importorskip("peft")
    model = pv.apply(make_model("vit"), "lora", r=4, **cfg)
    randomize_adapters(model)
    pv.save_adapter(model, tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(make_model("vit"), tmp_path)
    assert_outputs_close(outputs(theirs, "vit"), outputs(model, "vit"))


# ---- 4. counts on the full-size models -------------------------------------------------------

FULL = {"vit_base_patch16_224": "vit", "resnet50": "resnet"}
FULL_SPECS = {"lora": dict(r=8), "dora": dict(r=8), "loha": dict(r=8), "lokr": dict(r=8),
              "oft": dict(block_size=32)}


def full_size_counts() -> dict[tuple[str, str], int]:
    """Adapter parameters (head excluded) of each method's preset on ViT-B/16 and ResNet-50."""
    from peftvision.zoo import create_model

    counts = {}
    for model_name in FULL:
        for method, cfg in FULL_SPECS.items():
            model = pv.apply(create_model(model_name, meta=True, num_classes=1000), method, **cfg)
            counts[model_name, method] = pv.report(model).by_method[method]
    return counts


def test_full_size_counts_match_the_formulas():
    pytest.importorskip("timm")
    from peftvision.zoo import create_model

    counts = full_size_counts()
    for model_name, arch in FULL.items():
        base = create_model(model_name, meta=True, num_classes=1000)
        for method, cfg in FULL_SPECS.items():
            r = cfg.get("r", R)
            expected = 0
            for m in targeted(arch, base):
                out, fan_in = m.weight.shape[0], m.weight[0].numel()
                expected += {"lora": r * (out + fan_in), "dora": r * (out + fan_in) + out,
                             "loha": 2 * r * (out + fan_in)}.get(method, 0)
                if method == "lokr":
                    (a, b), (c, d) = _lokr_split(out), _lokr_split(m.weight.shape[1])
                    k = math.prod(m.weight.shape[2:])
                    expected += a * c + (r * (b + d * k) if r < max(b, d) / 2 else b * d * k)
                if method == "oft":
                    size = max(s for s in range(1, 33) if fan_in % s == 0)
                    expected += fan_in // size * size * (size - 1) // 2
            assert counts[model_name, method] == expected, (model_name, method)


# ---- half precision ----------------------------------------------------------------------------

@pytest.mark.parametrize("adapter_dtype", [None, "base"])  # fp32 adapters, or bf16 like the base
@pytest.mark.parametrize("name", ["dora", "lora-pissa", "loha", "lokr", "oft"])
def test_bfloat16_base(name, adapter_dtype):
    """bf16 in, bf16 out; with adapter_dtype="base" OFT once failed (torch solves no bf16 system)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Conv2d(3, 4, 3, padding=1)).to(torch.bfloat16)
    x, z = torch.randn(2, 16, dtype=torch.bfloat16), torch.randn(1, 3, 5, 5, dtype=torch.bfloat16)
    with torch.no_grad():
        y0 = (model[0](x), model[1](z))
    cfg = dataclasses.replace(copy.deepcopy(SPECS[name]), targets=["0", "1"])
    pv.apply(model, cfg, adapter_dtype=adapter_dtype)
    wanted = torch.float32 if adapter_dtype is None else torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {wanted}
    with torch.no_grad():
        y1 = (model[0](x), model[1](z))
        assert all(torch.equal(a, b) for a, b in zip(y0, y1))  # identity at init, bitwise
        randomize_adapters(model)
        y2 = (model[0](x), model[1](z))
        assert all(y.dtype == torch.bfloat16 for y in y2)
        pv.merge(model)
        y3 = (model[0](x), model[1](z))
        for a, b in zip(y3, y2):  # bf16 keeps 8 bits: a few roundings of the largest output
            torch.testing.assert_close(a, b, rtol=0, atol=0.02 * float(b.abs().max()))
