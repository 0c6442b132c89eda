"""add_weighted_adapter (issue 13): against the real peft, exactness of "cat" / full-rank "svd",
the LoRA variants it takes (rsLoRA, PiSSA, qkv slices, grouped convs, LoHa / LoKr by SVD), what
it refuses, and the new adapter as a normal named adapter (save / load / merge / delete)."""

from __future__ import annotations

import copy

import pytest
import torch
from models import make_inputs, make_model, run
from torch import nn

import peftvision as pv
from peftvision.checkpoint import adapter_tensors
from peftvision.errors import ConfigError
from peftvision.mixing import _layers

TOL = dict(rtol=1e-5, atol=1e-6)


def _out(model, arch="vit", inputs=None):
    model.eval()
    with torch.no_grad():
        return run(model, inputs or make_inputs(arch))


def _perturb(model, name, seed, scale=0.2):
    """Random values on every float tensor adapter `name` trains (factors, head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapter_tensors(model, name).values():
            if isinstance(t, nn.Parameter):
                t.copy_(torch.randn(t.shape, generator=g) * scale)


def _two(arch="vit", a=None, b=None, **first):
    """A model with adapters a and b, both moved off their initialisation."""
    model = make_model(arch)
    pv.apply(model, "lora", adapter_name="a", **{**dict(r=4, alpha=8, targets=["qkv", "fc1"]), **(a or {})},
             **first)
    pv.apply(model, "lora", adapter_name="b", **{**dict(r=2, alpha=3, targets=["qkv", "proj"]), **(b or {})})
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    return model


def _delta(model, adapter):
    """{canonical module: ΔW} of an adapter's layers."""
    return {c: layer.delta_weight().detach() for c, layer in _layers(model) if layer.adapter_name == adapter}


# -- against the real peft -------------------------------------------------------------------------
def _peft_pair(arch, configs):
    """The same adapters (same factors) in peft and in peftvision, heads untouched."""
    peft = pytest.importorskip("peft")
    base = make_model(arch)
    ours = copy.deepcopy(base)
    theirs = None
    for name, cfg in configs.items():
        pv.apply(ours, "lora", adapter_name=name, train_head=False, **cfg)
        pcfg = peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=cfg["targets"],
                               use_rslora=cfg.get("use_rslora", False))
        if theirs is None:
            theirs = peft.PeftModel(copy.deepcopy(base), pcfg, adapter_name=name)
        else:
            theirs.add_adapter(name, pcfg)
    mine = {(layer.adapter_name, c): layer for c, layer in _layers(ours)}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, m in theirs.base_model.model.named_modules():
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict):
                for adapter in m.lora_A:
                    layer = mine[(adapter, name)]
                    for ours_p, theirs_p in ((layer.lora_A, m.lora_A[adapter].weight),
                                             (layer.lora_B, m.lora_B[adapter].weight)):
                        theirs_p.copy_(torch.randn(theirs_p.shape, generator=g) * 0.2)
                        ours_p.copy_(theirs_p.reshape(ours_p.shape))
    return ours, theirs


PEFT_CASES = {  # id: (arch, adapters, weights, combination_type, svd_rank)
    "vit-cat": ("vit", {"a": dict(r=4, alpha=8, targets=["qkv", "fc1"]),
                        "b": dict(r=2, alpha=3, targets=["qkv", "proj"])}, [0.7, -0.3], "cat", None),
    "vit-svd-default-rank": ("vit", {"a": dict(r=4, alpha=8, targets=["qkv", "fc1"]),
                                     "b": dict(r=2, alpha=3, targets=["qkv", "proj"])}, [0.7, 0.3], "svd", None),
    "vit-svd-rank3": ("vit", {"a": dict(r=4, alpha=8, targets=["qkv", "fc1"]),
                              "b": dict(r=2, alpha=3, targets=["qkv", "proj"])}, [1.5, -0.5], "svd", 3),
    "vit-linear": ("vit", {"a": dict(r=3, alpha=6, targets=["qkv", "fc1"]),
                           "b": dict(r=3, alpha=2, targets=["qkv", "fc2"])}, [0.6, -0.4], "linear", None),
    "resnet-cat": ("resnet", {"a": dict(r=2, alpha=4, targets=["conv1", "conv2"]),
                              "b": dict(r=3, alpha=3, targets=["conv2", "conv3"])}, [0.5, 0.5], "cat", None),
    "resnet-svd": ("resnet", {"a": dict(r=2, alpha=4, targets=["conv1", "conv2"]),
                              "b": dict(r=3, alpha=3, targets=["conv2", "conv3"])}, [0.5, 0.8], "svd", 2),
    "resnet-linear": ("resnet", {"a": dict(r=2, alpha=4, targets=["conv2"]),
                                 "b": dict(r=2, alpha=1, targets=["conv2", "conv3"])}, [1.0, 2.0], "linear", None),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_mixed_outputs_equal_peft(case):
    arch, configs, weights, kind, rank = PEFT_CASES[case]
    ours, theirs = _peft_pair(arch, configs)
    theirs.add_weighted_adapter(list(configs), weights, "mix", combination_type=kind, svd_rank=rank)
    theirs.set_adapter("mix")
    pv.add_weighted_adapter(ours, list(configs), weights, adapter_name="mix", combination_type=kind,
                            svd_rank=rank)
    pv.set_adapter(ours, "mix")
    expected = _out(theirs, arch)
    torch.testing.assert_close(_out(ours, arch), expected, **TOL)
    with theirs.disable_adapter():
        plain = _out(theirs, arch)
    assert (expected - plain).abs().max() > 1e-3  # the mix does something


# -- exactness -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["vit", "resnet", "unet"])
def test_cat_with_unit_weights_equals_both_active(arch):
    """cat with weights [1, 1] is the two adapters active together, heads and BatchNorm
    statistics included (both combine trained user tensors as base + Σ(own - base))."""
    targets = {"vit": (["qkv", "fc1"], ["qkv", "proj"]), "resnet": (["conv1", "conv2"], ["conv2", "conv3"]),
               "unet": (None, ["to_q", "to_v", "conv1"])}[arch]
    model = _two(arch, a=dict(targets=targets[0]), b=dict(targets=targets[1]))
    if arch == "resnet":  # different statistics per adapter
        for name in ("a", "b"):
            pv.set_adapter(model, name)
            model.train()
            with torch.no_grad():
                run(model, (torch.randn(4, 3, 32, 32) * (2 if name == "a" else 0.5),))
    pv.set_adapter(model, ["a", "b"])
    both = _out(model, arch)
    pv.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], adapter_name="mix", combination_type="cat")
    pv.set_adapter(model, "mix")
    torch.testing.assert_close(_out(model, arch), both, **TOL)


def test_cat_and_full_rank_svd_give_the_weighted_sum_of_deltas():
    model = _two()
    da, db = _delta(model, "a"), _delta(model, "b")
    pv.add_weighted_adapter(model, ["a", "b"], [0.7, -1.2], adapter_name="cat", combination_type="cat")
    pv.add_weighted_adapter(model, ["a", "b"], [0.7, -1.2], adapter_name="svd", combination_type="svd",
                            svd_rank=6)
    for name in ("cat", "svd"):
        mixed = _delta(model, name)
        assert set(mixed) == set(da) | set(db)
        for module, delta in mixed.items():
            expected = 0.7 * da.get(module, 0) - 1.2 * db.get(module, 0)
            torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)
    assert pv.applied(model, "cat").method("lora").config.r == 6  # 4 + 2


def test_svd_truncates_to_the_best_rank_k_approximation():
    model = _two()
    pv.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], adapter_name="mix", svd_rank=2)
    da, db = _delta(model, "a"), _delta(model, "b")
    for module, delta in _delta(model, "mix").items():
        total = (da.get(module, 0) + db.get(module, 0)).flatten(1)  # (out, in·k·k)
        delta = delta.flatten(1)
        s = torch.linalg.svdvals(total)
        assert torch.linalg.matrix_rank(delta, atol=1e-4) <= 2
        # Eckart–Young: the error's spectral norm is the third singular value
        torch.testing.assert_close(torch.linalg.matrix_norm(total - delta, ord=2), s[2], rtol=1e-4, atol=1e-6)


def test_rslora_sources_mix_exactly():
    """The mix holds Σ wᵢ·ΔWᵢ whatever the sources' scaling (rsLoRA: alpha/√r)."""
    model = _two(a=dict(use_rslora=True), b=dict(use_rslora=True, r=3))
    da, db = _delta(model, "a"), _delta(model, "b")
    pv.add_weighted_adapter(model, ["a", "b"], [0.5, 2.0], adapter_name="mix", combination_type="cat")
    for module, delta in _delta(model, "mix").items():
        torch.testing.assert_close(delta, 0.5 * da.get(module, 0) + 2.0 * db.get(module, 0), rtol=1e-5,
                                   atol=1e-5)


def test_pissa_source_keeps_its_offset():
    model = make_model("vit")
    pv.apply(model, "lora", adapter_name="a", r=2, init="pissa", targets=["fc1"], train_head=False)
    pv.apply(model, "lora", adapter_name="b", r=2, targets=["fc1"])
    _perturb(model, "a", 1, 0.05)
    _perturb(model, "b", 2)
    da, db = _delta(model, "a"), _delta(model, "b")
    pv.add_weighted_adapter(model, ["a", "b"], [0.3, 0.9], adapter_name="mix", combination_type="cat")
    assert pv.applied(model, "mix").method("lora").config.r == 6  # PiSSA is rank 2r as factors
    for module, delta in _delta(model, "mix").items():
        torch.testing.assert_close(delta, 0.3 * da[module] + 0.9 * db[module], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["cat", "linear", "svd"])
def test_qkv_slices(kind):
    model = _two(a=dict(qkv_parts="qv", r=2, targets=None), b=dict(qkv_parts="qv", r=2, targets=None))
    da, db = _delta(model, "a"), _delta(model, "b")
    pv.add_weighted_adapter(model, ["a", "b"], [1.0, 0.5], adapter_name="mix", combination_type=kind,
                            svd_rank=8 if kind == "svd" else None)  # q and v: 2·(2 + 2)
    parts = pv.applied(model, "mix").method("lora").config.qkv_parts
    assert parts == (None if kind == "svd" else "qv")
    if kind != "linear":  # linear's cross terms make it approximate
        for module, delta in _delta(model, "mix").items():
            torch.testing.assert_close(delta, da[module] + 0.5 * db[module], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_grouped_conv(kind):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 4, 1))

    model = make()
    pv.apply(model, "lora", adapter_name="a", r=2, targets=["0", "2"])
    pv.apply(model, "lora", adapter_name="b", r=3, targets=["0"])
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    da, db = _delta(model, "a"), _delta(model, "b")
    pv.add_weighted_adapter(model, ["a", "b"], [0.4, -0.6], adapter_name="mix", combination_type=kind,
                            svd_rank=5 if kind == "svd" else None)  # 5 ≥ the per-group rank 2 + 3
    for module, delta in _delta(model, "mix").items():
        torch.testing.assert_close(delta, 0.4 * da[module] - 0.6 * db.get(module, 0), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 4, 6, 6)
    pv.set_adapter(model, "mix")
    y_mix = _out(model, inputs=(x,))
    pv.unload(model)
    with torch.no_grad():  # the same function written into the base weights
        model[0].weight += 0.4 * da["0"] - 0.6 * db["0"]
        model[2].weight += 0.4 * da["2"]
    torch.testing.assert_close(_out(model, inputs=(x,)), y_mix, **TOL)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_loha_and_lokr_mix_by_svd(method):
    model = make_model("vit")
    pv.apply(model, method, adapter_name="a", r=2, targets=["fc1"], train_head=False)
    pv.apply(model, "lora", adapter_name="b", r=2, targets=["fc1", "proj"])
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    da, db = _delta(model, "a"), _delta(model, "b")
    with pytest.raises(ConfigError, match="combination_type='svd'"):
        pv.add_weighted_adapter(model, ["a", "b"], [1, 1], adapter_name="m", combination_type="cat")
    pv.add_weighted_adapter(model, ["a", "b"], [1.0, -1.0], adapter_name="mix", svd_rank=32)  # full rank
    for module, delta in _delta(model, "mix").items():
        torch.testing.assert_close(delta, da.get(module, 0) - db[module], rtol=1e-4, atol=1e-5)


# -- a normal named adapter ------------------------------------------------------------------------
def test_mix_saves_loads_merges_and_deletes(tmp_path):
    model = _two()
    pv.add_weighted_adapter(model, ["a", "b"], [0.7, 0.3], adapter_name="mix", combination_type="cat")
    assert pv.adapters(model) == ("a", "b", "mix")
    assert pv.active_adapters(model) == ("a",)  # a new adapter starts inactive
    pv.set_adapter(model, "mix")
    y = _out(model)
    pv.save_adapter(model, tmp_path / "mix", adapter_name="mix")
    fresh = pv.load_adapter(make_model("vit"), tmp_path / "mix")
    torch.testing.assert_close(_out(fresh), y, rtol=0, atol=0)
    pv.merge(model, adapter_name="mix")
    torch.testing.assert_close(_out(model), y, **TOL)
    pv.unmerge(model)
    pv.set_adapter(model, "a")
    y_a = _out(model)
    pv.delete_adapter(model, "mix")
    assert pv.adapters(model) == ("a", "b")
    torch.testing.assert_close(_out(model), y_a, rtol=0, atol=0)


def test_sources_are_untouched():
    model = _two()
    before = {n: {k: v.clone() for k, v in adapter_tensors(model, n).items()} for n in ("a", "b")}
    outputs = {}
    for name in ("a", "b"):
        pv.set_adapter(model, name)
        outputs[name] = _out(model)
    pv.add_weighted_adapter(model, ["a", "b"], [0.7, 0.3], adapter_name="mix")
    for name in ("a", "b"):
        after = adapter_tensors(model, name)
        assert all(torch.equal(after[k], v) for k, v in before[name].items())
        pv.set_adapter(model, name)
        torch.testing.assert_close(_out(model), outputs[name], rtol=0, atol=0)


# -- refusals --------------------------------------------------------------------------------------
def test_dora_is_refused_with_the_reason():
    model = make_model("vit")
    pv.apply(model, "lora", adapter_name="a", r=2, use_dora=True, targets=["fc1"])
    pv.apply(model, "lora", adapter_name="b", r=2, targets=["fc1"])
    for kind in ("cat", "svd", "linear"):
        with pytest.raises(ConfigError, match="DoRA.*no sum of effects"):
            pv.add_weighted_adapter(model, ["a", "b"], [1, 1], adapter_name="m", combination_type=kind)
    assert pv.adapters(model) == ("a", "b")


@pytest.mark.parametrize("call,match", [
    (dict(adapters=["a", "zz"]), "no adapter named 'zz'"),
    (dict(adapters="a"), "non-empty list"),
    (dict(adapters=["a", "a"], weights=[1, 1]), "listed twice"),
    (dict(weights=[1.0]), "one finite number per adapter"),
    (dict(weights=[1.0, float("nan")]), "one finite number"),
    (dict(adapter_name="b"), "already exists"),
    (dict(adapter_name="x.y"), "without dots"),
    (dict(combination_type="ties"), "TIES"),
    (dict(combination_type="mean"), "must be one of"),
    (dict(combination_type="cat", svd_rank=2), "svd_rank"),
    (dict(svd_rank=0), "svd_rank"),
    (dict(combination_type="linear"), "one rank"),
])
def test_bad_arguments_name_the_problem(call, match):
    model = _two()
    kwargs = {**dict(adapters=["a", "b"], weights=[0.5, 0.5], adapter_name="mix"), **call}
    with pytest.raises(ConfigError, match=match):
        pv.add_weighted_adapter(model, **kwargs)
    assert pv.adapters(model) == ("a", "b")


def test_other_methods_and_merged_models_are_refused():
    model = make_model("vit")
    pv.apply(model, [pv.config("lora", r=2), "bias"], adapter_name="a")
    pv.apply(model, "lora", adapter_name="b", r=2)
    with pytest.raises(ConfigError, match=r"also has \['bias'\]"):
        pv.add_weighted_adapter(model, ["a", "b"], [1, 1], adapter_name="m")
    pv.merge(model)
    with pytest.raises(pv.MergeError, match="unmerge"):
        pv.add_weighted_adapter(model, ["b"], [1], adapter_name="m")


def test_different_qkv_slices_need_svd():
    model = _two(a=dict(qkv_parts="qv", targets=None), b=dict(qkv_parts="k", targets=None, r=4))
    with pytest.raises(ConfigError, match="different slices of qkv"):
        pv.add_weighted_adapter(model, ["a", "b"], [1, 1], adapter_name="m", combination_type="cat")
    pv.add_weighted_adapter(model, ["a", "b"], [1, 1], adapter_name="m", combination_type="svd")
