"""Property tests of merge / unmerge on standalone layers, against independent references.

Every adapter starts from a non-identity state (LoRA's B and SSF's γ, β are randomised), then
unmerged == merged == re-unmerged outputs, and the merged weights equal a reference computed here
in float64 from the adapter's parameters (never from the library's own `delta_weight`).

Tolerances. Exact maths in fp32: the merged path computes (W + ΔW)·x in one matmul/conv, the
unmerged path W·x + B·(A·x), so the two differ only by rounding of sums whose terms can be as
large as the largest output. An element-wise relative tolerance is meaningless for outputs that
cancel to ~0, so outputs use rtol=1e-5 with atol=1e-5 x (largest |output|) ("scaled" below).
Weights are compared the same way (atol scaled to the largest |W| or |ΔW|).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import peftvision as pv
from peftvision.layers import AdapterLayer

PROPS = settings(max_examples=25, deadline=None)
RTOL = 1e-5


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL,
                        scale: float | None = None) -> None:
    """allclose with atol scaled to the tensor's magnitude, or to `scale` when the rounding
    happened on larger intermediate values (see the module docstring)."""
    expected = expected.to(actual.dtype)
    if scale is None:
        scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-12))


def _max_abs(*tensors) -> float:
    return max(float(t.abs().max()) for t in tensors if t is not None and t.numel())


def wrapped(layer: nn.Module, method: str, **cfg) -> tuple[nn.Sequential, AdapterLayer]:
    """`layer` inside a generic model with `method` applied to it through the public API."""
    model = nn.Sequential(layer)
    pv.apply(model, method, targets=["0"], **cfg)
    adapter = model[0]
    assert isinstance(adapter, AdapterLayer) and adapter.weighted_layer is layer
    return model, adapter


def snapshot(layer: nn.Module) -> dict[str, torch.Tensor | None]:
    return {"weight": layer.weight.detach().clone(),
            "bias": None if layer.bias is None else layer.bias.detach().clone()}


def check_cycle(model: nn.Module, adapter: AdapterLayer, x: torch.Tensor, expected: torch.Tensor,
                before: dict, merged_weight: torch.Tensor, merged_bias: torch.Tensor | None):
    """unmerged == reference; merge gives the reference weights and the same outputs; unmerge
    restores the weights (and the bias, or its absence) and the outputs."""
    layer = adapter.weighted_layer
    keys = set(layer.state_dict())
    with torch.no_grad():
        y_unmerged = model(x)
        assert_scaled_close(y_unmerged, expected)

        pv.merge(model)
        assert adapter.merged
        assert_scaled_close(layer.weight, merged_weight)
        if merged_bias is None:
            assert layer.bias is None
        else:
            assert_scaled_close(layer.bias, merged_bias)
        y_merged = model(x)
        assert_scaled_close(y_merged, y_unmerged)

        pv.unmerge(model)
        assert not adapter.merged
        # (W + ΔW) - ΔW (or (γ·W) / γ) in fp32 is W up to rounding at the scale of the merged
        # values, which can be much larger than W: atol is scaled to the larger of the two.
        assert_scaled_close(layer.weight, before["weight"],
                            scale=_max_abs(before["weight"], merged_weight))
        if before["bias"] is None:
            assert layer.bias is None, "unmerge must remove the bias that merge created"
        else:
            assert_scaled_close(layer.bias, before["bias"], scale=_max_abs(before["bias"], merged_bias))
        assert set(layer.state_dict()) == keys
        assert_scaled_close(model(x), y_unmerged)


# ---- LoRA on Linear -------------------------------------------------------------------------

@PROPS
@given(
    in_f=st.integers(1, 24), out_f=st.integers(1, 24), r=st.integers(1, 8),
    alpha=st.one_of(st.none(), st.floats(0.1, 32.0)), bias=st.booleans(),
    lead=st.sampled_from([(3,), (2, 5)]), seed=st.integers(0, 2**16),
)
def test_lora_linear_merge_exact(in_f, out_f, r, alpha, bias, lead, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    before = snapshot(lin)
    model, adapter = wrapped(lin, "lora", r=r, alpha=alpha)
    with torch.no_grad():
        adapter.lora_B.normal_()  # a non-identity adapter
    a, b = adapter.lora_A.detach().double(), adapter.lora_B.detach().double()
    assert a.shape == (r, in_f) and b.shape == (out_f, r)
    scaling = (r if alpha is None else alpha) / r
    delta = scaling * b @ a  # (out, in)
    x = torch.randn(*lead, in_f)
    expected = F.linear(x.double(), before["weight"].double() + delta,
                        None if before["bias"] is None else before["bias"].double())
    check_cycle(model, adapter, x, expected, before,
                merged_weight=before["weight"].double() + delta, merged_bias=before["bias"])


# ---- LoRA on Conv2d -------------------------------------------------------------------------

def _pads(padding, kernel, dilation) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, as torch defines 'same' (extra pad on the right)."""
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in padding]


def _pad_input(x, pads, mode) -> torch.Tensor:
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants the last dim first
    return F.pad(x, flat, mode="constant" if mode == "zeros" else mode)


@st.composite
def conv_specs(draw):
    g = draw(st.sampled_from([1, 1, 2, 3]))
    cin, cout = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
    kernel = (draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 3, 5])))
    dilation = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
    stride = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
    same = stride == (1, 1) and draw(st.booleans())
    padding = "same" if same else (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    pads = _pads(padding, kernel, dilation)
    # spatial sizes big enough for the kernel and for reflect padding (pad < size)
    size = tuple(max(d * (k - 1) + 1, max(p) + 1) + draw(st.integers(0, 4))
                 for k, d, p in zip(kernel, dilation, pads))
    return dict(g=g, cin=cin, cout=cout, kernel=kernel, dilation=dilation, stride=stride,
                padding=padding, mode=mode, size=size, bias=draw(st.booleans()))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@PROPS
@given(spec=conv_specs(), r=st.integers(1, 3), alpha=st.floats(0.5, 16.0), seed=st.integers(0, 2**16))
def test_lora_conv2d_merge_exact(spec, r, alpha, seed):
    torch.manual_seed(seed)
    g = spec["g"]
    conv = nn.Conv2d(spec["cin"], spec["cout"], spec["kernel"], stride=spec["stride"],
                     padding=spec["padding"], dilation=spec["dilation"], groups=g,
                     bias=spec["bias"], padding_mode=spec["mode"])
    before = snapshot(conv)
    model, adapter = wrapped(conv, "lora", r=r, alpha=alpha)
    with torch.no_grad():
        adapter.lora_B.normal_()
    a, b = adapter.lora_A.detach().double(), adapter.lora_B.detach().double()
    # the rank is per group: A has g*r output channels with the base kernel, B is 1x1
    assert a.shape == (g * r, spec["cin"] // g, *spec["kernel"])
    assert b.shape == (spec["cout"], r, 1, 1)
    scaling = alpha / r

    # brute-force ΔW: output channel o of group j mixes A's channels j*r .. j*r+r-1
    ob = spec["cout"] // g
    delta = torch.zeros_like(before["weight"], dtype=torch.float64)
    for o in range(spec["cout"]):
        j = o // ob
        for i in range(r):
            delta[o] += scaling * b[o, i, 0, 0] * a[j * r + i]

    x = torch.randn(2, spec["cin"], *spec["size"]).double()
    xp = _pad_input(x, _pads(spec["padding"], spec["kernel"], spec["dilation"]), spec["mode"])
    geometry = dict(stride=spec["stride"], dilation=spec["dilation"], groups=g)
    bias0 = None if before["bias"] is None else before["bias"].double()
    # the adapter branch as a composition of two convs, B∘A, on the same padded input ...
    composed = F.conv2d(F.conv2d(xp, a, None, **geometry), b, None, groups=g) * scaling
    # ... equals one conv with the brute-force ΔW (this is what makes conv LoRA mergeable)
    assert_scaled_close(F.conv2d(xp, delta, None, **geometry), composed, rtol=1e-10)
    assert_scaled_close(adapter.delta_weight().double(), delta)

    expected = F.conv2d(xp, before["weight"].double(), bias0, **geometry) + composed
    check_cycle(model, adapter, x.float(), expected, before,
                merged_weight=before["weight"].double() + delta, merged_bias=before["bias"])


@PROPS
@given(dims=st.sampled_from([1, 3]), g=st.sampled_from([1, 2]), k=st.sampled_from([1, 3]),
       stride=st.sampled_from([1, 2]), r=st.integers(1, 3), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_lora_conv1d_conv3d_merge_exact(dims, g, k, stride, r, bias, seed):
    torch.manual_seed(seed)
    conv_cls, conv_fn = {1: (nn.Conv1d, F.conv1d), 3: (nn.Conv3d, F.conv3d)}[dims]
    conv = conv_cls(2 * g, 3 * g, k, stride=stride, padding=k // 2, groups=g, bias=bias)
    before = snapshot(conv)
    model, adapter = wrapped(conv, "lora", r=r)
    with torch.no_grad():
        adapter.lora_B.normal_()
    a, b = adapter.lora_A.detach().double(), adapter.lora_B.detach().double()
    delta = torch.cat([torch.einsum("or,r...->o...", b[j * 3:(j + 1) * 3].flatten(1), a[j * r:(j + 1) * r])
                       for j in range(g)])  # alpha = r: scaling 1
    x = torch.randn(2, 2 * g, *([5] * dims)).double()
    geometry = dict(stride=stride, padding=k // 2, groups=g)
    bias0 = None if before["bias"] is None else before["bias"].double()
    expected = conv_fn(x, before["weight"].double() + delta, bias0, **geometry)
    check_cycle(model, adapter, x.float(), expected, before,
                merged_weight=before["weight"].double() + delta, merged_bias=before["bias"])


# ---- LoRA on a fused qkv Linear -------------------------------------------------------------

class FusedAttention(nn.Module):
    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)  # (B, N, 3D) = [q; k; v]


@PROPS
@given(parts=st.sampled_from(["q", "k", "v", "qk", "qv", "kv", "vq", "k,v", "QV"]),
       dim=st.integers(1, 12), r=st.integers(1, 4), alpha=st.floats(0.5, 16.0),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_lora_qkv_parts_adapt_only_chosen_slices(parts, dim, r, alpha, bias, seed):
    torch.manual_seed(seed)
    model = FusedAttention(dim, bias)
    qkv = model.qkv
    before = snapshot(qkv)
    pv.apply(model, "lora", targets=["qkv"], qkv_parts=parts, r=r, alpha=alpha)
    adapter = model.qkv
    assert isinstance(adapter, AdapterLayer) and adapter.weighted_layer is qkv
    chosen = sorted({p for p in parts.lower() if p in "qkv"}, key="qkv".index)
    # rank r for each adapted part, nothing for the others
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == len(chosen) * r * (dim + dim)
    with torch.no_grad():
        adapter.lora_B.normal_()

    a, b = adapter.lora_A.detach().double(), adapter.lora_B.detach().double()  # (n, r, D), (n, D, r)
    delta = torch.zeros(3 * dim, dim, dtype=torch.float64)
    for i, part in enumerate(chosen):
        slot = "qkv".index(part)
        delta[slot * dim:(slot + 1) * dim] = (alpha / r) * b[i] @ a[i]
    x = torch.randn(2, 4, dim)
    bias0 = None if before["bias"] is None else before["bias"].double()
    expected = F.linear(x.double(), before["weight"].double() + delta, bias0)

    with torch.no_grad():
        y_base = qkv(x)
        y = model(x)
    for slot, part in enumerate("qkv"):
        sl = slice(slot * dim, (slot + 1) * dim)
        if part in chosen:
            assert not torch.equal(y[..., sl], y_base[..., sl])
        else:  # exactly the base output: zeros are added to the other slices
            assert torch.equal(y[..., sl], y_base[..., sl]), f"slice {part} changed"
    check_cycle(model, adapter, x, expected, before,
                merged_weight=before["weight"].double() + delta, merged_bias=before["bias"])
    pv.merge(model)
    for slot, part in enumerate("qkv"):
        if part not in chosen:  # W + 0: the rows of the other slices are untouched, bitwise
            sl = slice(slot * dim, (slot + 1) * dim)
            assert torch.equal(qkv.weight[sl], before["weight"][sl])


# ---- SSF ------------------------------------------------------------------------------------

def _randomise_ssf(adapter: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """γ with random sign and magnitude in [0.5, 2] (away from 0 so unmerge's division is
    well-conditioned), β ~ N(0, 1)."""
    with torch.no_grad():
        c = adapter.ssf_scale.numel()
        sign = torch.where(torch.rand(c) < 0.5, -1.0, 1.0)
        adapter.ssf_scale.copy_(sign * (0.5 + 1.5 * torch.rand(c)))
        adapter.ssf_shift.normal_()
    return adapter.ssf_scale.detach().double(), adapter.ssf_shift.detach().double()


def _ssf_merge_case(layer, x, channel_dim):
    before = snapshot(layer)
    with torch.no_grad():
        y_base = layer(x).double()
    model, adapter = wrapped(layer, "ssf")
    gamma, beta = _randomise_ssf(adapter)
    shape = [1] * y_base.dim()
    shape[channel_dim] = -1
    expected = y_base * gamma.view(shape) + beta.view(shape)
    w0 = before["weight"].double()
    merged_weight = w0 * gamma.view(-1, *([1] * (w0.dim() - 1)))
    b0 = torch.zeros_like(gamma) if before["bias"] is None else before["bias"].double()
    check_cycle(model, adapter, x, expected, before, merged_weight=merged_weight,
                merged_bias=gamma * b0 + beta)
    return before


@PROPS
@given(in_f=st.integers(1, 16), out_f=st.integers(1, 16), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_ssf_linear_nlc_merge_exact(in_f, out_f, bias, seed):
    torch.manual_seed(seed)
    _ssf_merge_case(nn.Linear(in_f, out_f, bias=bias), torch.randn(2, 5, in_f), channel_dim=-1)


@PROPS
@given(cin=st.integers(1, 6), cout=st.integers(1, 6), k=st.sampled_from([1, 3]),
       stride=st.sampled_from([1, 2]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_ssf_conv2d_nchw_merge_exact(cin, cout, k, stride, bias, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)
    _ssf_merge_case(conv, torch.randn(2, cin, 6, 5), channel_dim=1)


@PROPS
@given(c=st.integers(2, 16), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_ssf_layernorm_merge_exact(c, bias, seed):
    torch.manual_seed(seed)
    ln = nn.LayerNorm(c, bias=bias)
    with torch.no_grad():
        ln.weight.normal_()
        if bias:
            ln.bias.normal_()
    _ssf_merge_case(ln, torch.randn(2, 5, c), channel_dim=-1)


def test_ssf_layernorm_multidim_normalized_shape_merge_exact():
    # LayerNorm((4, 6)) has a (4, 6) weight whose channels (γ's axis) are the *last* dim.
    torch.manual_seed(0)
    ln = nn.LayerNorm((4, 6))
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 4, 6)
    before = snapshot(ln)
    with torch.no_grad():
        y_base = ln(x).double()
    model, adapter = wrapped(ln, "ssf")
    gamma, beta = _randomise_ssf(adapter)
    assert gamma.shape == (6,)
    check_cycle(model, adapter, x, y_base * gamma + beta, before,
                merged_weight=before["weight"].double() * gamma,
                merged_bias=before["bias"].double() * gamma + beta)


@PROPS
@given(c=st.integers(1, 8), affine_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_ssf_batchnorm2d_eval_merge_exact(c, affine_bias, seed):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        if affine_bias:
            bn.bias.normal_()
    bn.eval()  # merging folds into the affine part; train-mode BN would renormalise anyway
    _ssf_merge_case(bn, torch.randn(2, c, 4, 3), channel_dim=1)


@PROPS
@given(groups=st.integers(1, 4), per_group=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_ssf_groupnorm_merge_exact(groups, per_group, seed):
    torch.manual_seed(seed)
    gn = nn.GroupNorm(groups, groups * per_group)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    _ssf_merge_case(gn, torch.randn(2, groups * per_group, 3, 4), channel_dim=1)


# ---- LoRA and SSF stacked on one layer -----------------------------------------------------

@PROPS
@given(order=st.sampled_from([("lora", "ssf"), ("ssf", "lora")]), in_f=st.integers(1, 12),
       out_f=st.integers(1, 12), r=st.integers(1, 4), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_lora_and_ssf_on_one_linear_merge_in_either_order(order, in_f, out_f, r, bias, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    before = snapshot(lin)
    model = nn.Sequential(lin)
    cfgs = {"lora": pv.config("lora", r=r, targets=["0"]), "ssf": pv.config("ssf", targets=["0"])}
    pv.apply(model, [cfgs[name] for name in order])
    outer = model[0]
    inner = outer.base_layer
    lora, ssf = (inner, outer) if order == ("lora", "ssf") else (outer, inner)
    with torch.no_grad():
        lora.lora_B.normal_()
    gamma, beta = _randomise_ssf(ssf)
    delta = lora.lora_B.detach().double() @ lora.lora_A.detach().double()  # alpha = r
    w0 = before["weight"].double()
    b0 = torch.zeros(out_f, dtype=torch.float64) if before["bias"] is None else before["bias"].double()
    if order == ("lora", "ssf"):  # ssf(lora(x)) = γ((W + ΔW)x + b) + β
        w, b = gamma[:, None] * (w0 + delta), gamma * b0 + beta
    else:  # lora(ssf(x)) = γ(Wx + b) + β + ΔWx
        w, b = gamma[:, None] * w0 + delta, gamma * b0 + beta
    x = torch.randn(3, in_f)
    check_cycle(model, outer, x, F.linear(x.double(), w, b), before, merged_weight=w, merged_bias=b)
    assert not inner.merged
