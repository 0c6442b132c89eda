"""SH-PEFT and SPT: data-chosen sparse deltas (methods/sparse.py, shpeft.py, spt.py).

Selection against brute-force references, the sparse-delta layer's gradients against dense
autograd, the conformance checks of DESIGN.md on tiny ViT / ResNet, and bad input."""

from __future__ import annotations

import collections
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from models import make_inputs, make_model, run
from safetensors.torch import load_file
from torch import nn

import peftvision as pv
from peftvision import ConfigError, CorruptAdapterError
from peftvision.layers import Adapter, AdapterLayer
from peftvision.methods.sparse_layers import SampledPattern, SparseDeltaLayer
from peftvision.methods.sparse_selection import top_k

# ---- helpers --------------------------------------------------------------------------------


def batches(arch: str = "vit", n: int = 3, seed: int = 5, batch: int = 4) -> list:
    g = torch.Generator().manual_seed(seed)
    if arch == "unet":
        return [((torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
                  torch.randn(2, 3, 16, generator=g)), torch.randn(2, 4, 8, 8, generator=g))
                for _ in range(n)]
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(n)]


def unet_loss(out, target):
    return F.mse_loss(out.sample, target)


# name -> apply() options (data added by `applied`)
SPECS = {
    "shpeft": dict(fraction=0.03),
    "shpeft-l1": dict(estimator="l1", count=300, lam=2.0),
    "spt": dict(fraction=0.03),
}
ARCHS = ["vit", "resnet"]
CASES = [(a, m) for a in ARCHS for m in SPECS]


def applied(arch: str, spec: str, seed: int = 0) -> nn.Module:
    method = spec.split("-")[0]
    return pv.apply(make_model(arch, seed), method, data=batches(arch), **SPECS[spec])


def sparse_layers(model: nn.Module) -> dict[str, SparseDeltaLayer]:
    """Canonical module name -> its SparseDeltaLayer (the layers sit innermost)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SparseDeltaLayer):
            out[name.replace(".base_layer", "")] = m
    return out


def chosen(model: nn.Module) -> dict[str, list[int]]:
    """Canonical tensor name -> chosen flat indices."""
    return {f"{mod}.{p}": layer.indices(p).tolist()
            for mod, layer in sparse_layers(model).items() for p in layer.names}


def outputs(model: nn.Module, arch: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return run(model, make_inputs(arch))


def head_names(model: nn.Module) -> set[str]:
    head = model.get_classifier()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def scope_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The default scope, computed independently: every parameter but the head's and those
    held by the model object itself (ViT cls_token / pos_embed), in model order."""
    head = head_names(model)
    return [(n, p) for n, p in model.named_parameters() if n not in head and "." in n]


def randomize(model: nn.Module, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Adapter):
                for p in m.parameters(recurse=False):
                    p.add_(torch.randn(p.shape, generator=g) * scale)


class Snapshot:
    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.flags = {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()}
        self.types = [type(m) for m in model.modules()]
        self.modes = [m.training for m in model.modules()]

    def assert_unchanged(self, model: nn.Module) -> None:
        state = model.state_dict()
        assert state.keys() == self.state.keys()
        assert all(torch.equal(state[k], v) for k, v in self.state.items())
        assert {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()} == self.flags
        assert [type(m) for m in model.modules()] == self.types
        assert [m.training for m in model.modules()] == self.modes
        assert pv.applied(model) is None


# ---- brute-force references -------------------------------------------------------------------


def reference_grads(model: nn.Module, data: list) -> list[list[torch.Tensor]]:
    """Per batch, the gradient of every scope tensor, by plain autograd (eval mode)."""
    model = copy.deepcopy(model).eval()
    params = scope_params(model)
    out = []
    for x, y in data:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        out.append([p.grad.clone() for _, p in params])
    return out


def reference_topk(scores: torch.Tensor, k: int) -> set[int]:
    """Stable sort: equal scores keep model order, so ties go to the earlier weight."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return set(order[:k].tolist())


def to_tensor_indices(positions: set[int], params) -> dict[str, list[int]]:
    out, offset = {}, 0
    for name, p in params:
        idx = sorted(i - offset for i in positions if offset <= i < offset + p.numel())
        if idx:
            out[name] = idx
        offset += p.numel()
    return out


@pytest.mark.parametrize("estimator,lam", [("l2", 1.0), ("l1", 1.0), ("l2", 0.0), ("l1", 0.0),
                                           ("l2", 3.0), ("l1", 0.25)])
def test_shpeft_selection_equals_brute_force(estimator, lam):
    model, data = make_model("vit"), batches("vit")
    params = scope_params(model)
    grads = reference_grads(model, data)
    td = []
    for i in range(len(params)):
        acc = torch.zeros_like(params[i][1])
        for g in grads:  # the same ops as the library, so equal scores round alike
            acc = torch.addcmul(acc, g[i], g[i]) if estimator == "l2" else acc + g[i]
        td.append(acc if estimator == "l2" else acc.abs())
    ta = [p.detach().square() if estimator == "l2" else p.detach().abs() for _, p in params]
    scale = lam * sum(float(t.sum(dtype=torch.float64)) for t in td) / sum(
        float(t.sum(dtype=torch.float64)) for t in ta)
    scores = torch.cat([torch.add(a, b, alpha=scale).reshape(-1) for a, b in zip(td, ta)])
    k = round(0.05 * scores.numel())
    expected = to_tensor_indices(reference_topk(scores, k), params)

    pv.apply(model, "shpeft", data=data, fraction=0.05, estimator=estimator, lam=lam)
    assert chosen(model) == expected
    assert sum(len(v) for v in expected.values()) == k


def test_lambda_changes_the_selection():
    picks = [chosen(pv.apply(make_model("vit"), "shpeft", data=batches(), fraction=0.05, lam=lam))
             for lam in (0.0, 1.0, 50.0)]
    assert picks[0] != picks[1] != picks[2]


def test_spt_plan_equals_brute_force():
    model, data = make_model("vit"), batches("vit")
    params = scope_params(model)
    grads = reference_grads(model, data)
    sens = [torch.zeros_like(p) for _, p in params]
    for g in grads:
        sens = [torch.addcmul(s, gi, gi) for s, gi in zip(sens, g)]
    budget = round(0.1 * sum(p.numel() for _, p in params))
    r, alpha, beta = 8, 10.0, 5.0
    modules = dict(model.named_modules())
    scores = torch.cat([s.reshape(-1) for s in sens]).tolist()
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # ties to the earlier weight

    named = dict(model.named_parameters())

    def rule(name, n):  # the reference rule for n chosen entries of tensor `name`: (kind, trained)
        mod_name, attr = name.rsplit(".", 1)
        mod, p = modules[mod_name], named[name]
        lora_cost = None
        if attr == "weight" and isinstance(mod, nn.Linear):
            lora_cost = r * (mod.in_features + mod.out_features)
        elif attr == "weight" and isinstance(mod, nn.Conv2d):
            lora_cost = r * (mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] + mod.out_channels)
        if lora_cost is not None and n >= lora_cost / alpha:
            return "lora", lora_cost
        if p.dim() == 1 and n >= p.numel() / beta:
            return "whole", p.numel()
        return "sparse", n

    owner = [name for name, p in params for _ in range(p.numel())]  # tensor of each position
    k = budget  # the largest k whose plan trains at most the budget (LoRA parts counted)
    while sum(rule(n, c)[1] for n, c in collections.Counter(owner[i] for i in ranked[:k]).items()) > budget:
        k -= 1
    lora, sparse = [], {}
    for name, idx in to_tensor_indices(set(ranked[:k]), params).items():
        kind = rule(name, len(idx))[0]
        if kind == "lora":
            lora.append(name.rsplit(".", 1)[0])
        else:
            sparse[name] = list(range(named[name].numel())) if kind == "whole" else idx
    assert lora and any(len(v) < dict(model.named_parameters())[n].numel() for n, v in sparse.items())

    pv.apply(model, "spt", data=data, fraction=0.1)
    cfg = pv.applied(model).method("spt").config
    assert cfg.lora_modules == sorted(lora)
    assert chosen(model) == sparse
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora_params == sum(r * (modules[m].in_features + modules[m].out_features) for m in lora)


@pytest.mark.parametrize("alpha,expect_lora", [(1e-6, False), (1e6, True)])
def test_spt_alpha_moves_matrices_between_lora_and_sparse(alpha, expect_lora):
    model = pv.apply(make_model("vit"), "spt", data=batches(), fraction=0.3, alpha=alpha)
    lora = pv.applied(model).method("spt").config.lora_modules
    weights = [n for n in chosen(model) if n.endswith(".weight") and "norm" not in n]
    assert bool(lora) == expect_lora and bool(weights) != expect_lora


def test_spt_beta_tunes_vectors_whole():
    model = pv.apply(make_model("vit"), "spt", data=batches(), fraction=0.01, alpha=1e-6, beta=1e6)
    vectors = [(layer, a) for layer in sparse_layers(model).values() for a in layer.names
               if layer.target(a).dim() == 1]
    assert vectors
    assert all(layer.indices(a).tolist() == list(range(layer.target(a).numel())) for layer, a in vectors)


# ---- budget, ties, reproducibility ------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("opts", [dict(fraction=0.01), dict(fraction=0.29), dict(count=123),
                                  dict(fraction=1.0)])
def test_counts_match_the_budget(arch, opts):
    model = make_model(arch)
    total = sum(p.numel() for _, p in scope_params(model))
    k = opts.get("count") or round(opts["fraction"] * total)
    model = pv.apply(model, "shpeft", data=batches(arch), **opts)
    assert sum(len(v) for v in chosen(model).values()) == k
    assert sum(pv.applied(model).method("shpeft").config.selection.values()) == k
    assert pv.report(model).by_method["shpeft"] == k


def test_top_k_ties_go_to_the_earliest_positions():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    assert top_k(scores, 3).tolist() == [1, 2, 3]
    assert top_k(scores, 5).tolist() == [1, 2, 3, 4, 6]
    assert top_k(torch.zeros(10), 4).tolist() == [0, 1, 2, 3]


def test_ties_in_a_model_are_broken_by_model_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[2].weight.fill_(0.5)
    x = torch.ones(2, 3)
    data = [(x, torch.zeros(2, 1))]
    pv.apply(model, "shpeft", data=data, count=5, lam=0.0, loss_fn=lambda o, t: (o - t).square().mean())
    # every first-layer weight has the same gradient; the last layer's are larger (4 > 1.5 per unit)
    picks = chosen(model)
    assert picks == {"2.weight": [0, 1, 2, 3], "0.weight": [0]}


def test_selection_is_reproducible():
    cfg = pv.config("shpeft", data=batches(), fraction=0.05)
    a = pv.apply(make_model("vit"), cfg)
    b = pv.apply(make_model("vit"), cfg)  # the same config object chooses again from its data
    c = pv.apply(make_model("vit"), "shpeft", data=batches(), fraction=0.05)
    assert chosen(a) == chosen(b) == chosen(c)


@pytest.mark.parametrize("method", ["shpeft", "spt"])
def test_one_config_on_two_models_gives_each_its_own_selection(method):
    """Regression: apply stored the choice in the config, so a second model silently reused the
    first model's selection (and got no data)."""
    data = batches()
    cfg = pv.config(method, data=data, fraction=0.05)
    before = copy.copy(cfg)
    a = pv.apply(make_model("vit", 0), cfg)
    assert cfg == before and cfg.data is data and cfg.selection is None  # the config is unchanged
    b = pv.apply(make_model("vit", 1), cfg)
    assert cfg == before
    assert chosen(b) == chosen(pv.apply(make_model("vit", 1), method, data=batches(), fraction=0.05))
    assert chosen(a) != chosen(b)
    rec_a, rec_b = pv.applied(a).method(method), pv.applied(b).method(method)
    assert rec_a.config.data is None and rec_a.config.selection != rec_b.config.selection
    assert {k: v.tolist() for k, v in rec_a.details["indices"].items()} == chosen(a)


def test_a_recorded_selection_without_its_indices_refuses_to_run():
    cfg = pv.get_method("shpeft").from_dict(
        pv.applied(applied("vit", "shpeft")).method("shpeft").config.to_dict())
    model = pv.apply(make_model("vit"), cfg)  # layers rebuilt; the indices come from load_adapter
    with pytest.raises(CorruptAdapterError, match="load_adapter"):
        outputs(model, "vit")


# ---- sparse deltas: gradients, memory, training ---------------------------------------------


def _dense_reference(layer: nn.Module, layer_sd: SparseDeltaLayer, x: torch.Tensor, g: torch.Tensor):
    vals = {n: getattr(layer_sd, f"values_{n}").detach().clone().requires_grad_() for n in layer_sd.names}
    xr = x.detach().clone().requires_grad_()
    eff = {n: getattr(layer, n).reshape(-1).index_add(0, layer_sd.indices(n), vals[n]).view_as(getattr(layer, n))
           for n in layer_sd.names}
    y = torch.func.functional_call(layer, eff, (xr,))
    y.backward(g)
    return y, xr.grad, {n: v.grad for n, v in vals.items()}


@pytest.mark.parametrize("make,shape,density", [
    (lambda: nn.Linear(20, 30), (3, 5, 20), 0.02),  # sampled matmul for the values' gradient
    (lambda: nn.Linear(30, 20), (3, 5, 30), 0.02),  # in > out: sampled on Wᵀ's pattern
    (lambda: nn.Linear(30, 20), (3, 5, 30), 0.09),  # just under SAMPLED_MAX_DENSITY
    (lambda: nn.Linear(20, 30), (3, 5, 20), 0.5),  # dense weight gradient, gathered
    (lambda: nn.Conv2d(4, 6, 3, padding=1, stride=2), (2, 4, 9, 9), 0.1),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"), (2, 4, 9, 9), 0.1),
    (lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2), (2, 4, 9, 9), 0.1),
    (lambda: nn.Conv1d(4, 6, 3), (2, 4, 9), 0.3),
    (lambda: nn.LayerNorm(12), (2, 3, 12), 0.3),
    (lambda: nn.GroupNorm(2, 6), (2, 6, 4, 4), 0.5),
])
def test_sparse_layer_gradients_equal_dense_autograd(make, shape, density):
    torch.manual_seed(0)
    layer = make().double().requires_grad_(False)
    sel = {}
    for n, p in layer.named_parameters():
        k = max(1, int(density * p.numel()))
        sel[n] = torch.randperm(p.numel())[:k].sort().values
    sd = SparseDeltaLayer(layer, sel)
    with torch.no_grad():
        for n in sd.names:
            getattr(sd, f"values_{n}").normal_()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = sd(x)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, gx_ref, gv_ref = _dense_reference(layer, sd, x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, gx_ref, rtol=1e-12, atol=1e-12)
    for n in sd.names:
        grad = getattr(sd, f"values_{n}").grad
        assert grad.shape == (sel[n].numel(),)  # the gradient is k values, never a dense tensor
        torch.testing.assert_close(grad, gv_ref[n], rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_and_optimizer_state_scale_with_the_selection(arch):
    model = applied(arch, "shpeft").train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = run(model, make_inputs(arch))
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    opt.step()
    head = {n.replace(".base_layer", "") for n in head_names(model)}
    for name, p in model.named_parameters():
        if name in head:
            continue
        if ".values_" in name:
            layer_name, attr = name.rsplit(".values_", 1)
            k = model.get_submodule(layer_name).indices(attr).numel()
            assert p.shape == p.grad.shape == (k,)
            assert all(s.shape == (k,) for s in opt.state[p].values() if s.dim())
        else:
            assert not p.requires_grad and p.grad is None, name
    buffers = {n: b for n, b in model.named_buffers() if ".indices_" in n}
    assert buffers and all(b.dtype == torch.int32 and b.dim() == 1 for b in buffers.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_after_training_only_selected_weights_differ(arch):
    base = make_model(arch)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = pv.apply(copy.deepcopy(base), "shpeft", data=batches(arch), fraction=0.05).train()
    picks = chosen(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    for x, y in batches(arch, n=3, seed=9):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    frozen = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(p, original[n]) for n, p in frozen.items())  # base never written
    pv.merge(model)
    merged = {n.replace(".base_layer", ""): p.detach() for n, p in model.named_parameters()}
    head = head_names(base)
    moved = 0
    for name, before in original.items():
        if name in head:
            continue
        diff = (merged[name] != before).reshape(-1).nonzero().squeeze(1).tolist()
        assert set(diff) <= set(picks.get(name, [])), name  # outside the selection: bitwise equal
        moved += len(diff)
    assert moved > 0.9 * sum(len(v) for v in picks.values())
    pv.unmerge(model)
    assert all(torch.equal(p, original[n]) for n, p in frozen.items())


# ---- conformance (DESIGN.md), on tiny ViT and ResNet ----------------------------------------


@pytest.mark.parametrize("arch,spec", CASES)
def test_identity_at_init(arch, spec):
    base = make_model(arch)
    y0 = outputs(copy.deepcopy(base), arch)
    assert torch.equal(outputs(applied(arch, spec), arch), y0)  # zero deltas add exactly 0


@pytest.mark.parametrize("arch,spec", CASES)
def test_only_selected_values_train_and_the_count_is_the_formula(arch, spec):
    model = applied(arch, spec)
    cfg = pv.applied(model).methods[0].config
    head = head_names(model)
    modules = dict(model.named_modules())
    lora_cost = 0
    for m in getattr(cfg, "lora_modules", None) or []:
        layer = modules[m].weighted_layer
        ksize = layer.weight[0, 0].numel() if layer.weight.dim() > 2 else 1
        fan_in = getattr(layer, "in_features", None) or layer.in_channels * ksize
        lora_cost += 8 * (fan_in + (getattr(layer, "out_features", None) or layer.out_channels))
    head_count = sum(p.numel() for n, p in model.named_parameters() if n in head)
    expected = sum(cfg.selection.values()) + lora_cost + head_count
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected == pv.report(model).trainable
    assert all(n in head or ".values_" in n or ".lora_" in n for n in trainable)


@pytest.mark.parametrize("arch,spec", CASES)
def test_training_step_moves_only_the_selected_values(arch, spec):
    model = applied(arch, spec).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = run(model, make_inputs(arch))
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(".values_" in n for n in changed)


@pytest.mark.parametrize("arch,spec", CASES)
def test_merge_unmerge_roundtrip_is_exact(arch, spec):
    model = applied(arch, spec)
    randomize(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = outputs(model, arch)
    pv.merge(model)
    merged = outputs(model, arch)
    pv.unmerge(model)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert torch.equal(outputs(model, arch), unmerged)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # bitwise


@pytest.mark.parametrize("arch,spec", CASES)
def test_save_load_onto_a_fresh_base_without_data(arch, spec, tmp_path):
    model = applied(arch, spec).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # train mode: BatchNorm statistics move too
        F.cross_entropy(run(model, make_inputs(arch)), torch.tensor([0, 1])).backward()
        opt.step()
        opt.zero_grad()
    randomize(model, 0.05)
    pv.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())["methods"][0]["config"]
    assert "data" not in config and "loss_fn" not in config and config["selection"]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all(v.dtype == torch.int32 for k, v in saved.items() if ".indices_" in k)
    fresh = pv.load_adapter(make_model(arch), tmp_path)  # no data anywhere
    assert torch.equal(outputs(model, arch), outputs(fresh, arch))
    assert chosen(fresh) == chosen(model)


@pytest.mark.parametrize("arch,spec", CASES)
def test_unload_restores_the_original_exactly(arch, spec):
    base = make_model(arch)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    types = [type(m) for m in base.modules()]
    flags = [p.requires_grad for p in base.parameters()]
    model = pv.apply(base, spec.split("-")[0], data=batches(arch), **SPECS[spec])
    randomize(model)
    pv.merge(model)
    model = pv.unload(model)
    state = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)
    assert [type(m) for m in model.modules()] == types
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("arch,spec", CASES)
def test_unload_merged_is_a_plain_model_with_the_same_outputs(arch, spec):
    model = applied(arch, spec)
    randomize(model)
    y = outputs(model, arch)
    plain = pv.unload(model, merge=True)
    assert not any(isinstance(m, Adapter) for m in plain.modules())
    torch.testing.assert_close(outputs(plain, arch), y, rtol=1e-4, atol=1e-5)


def test_composes_with_lora_inside_its_wrapper(tmp_path):
    model = pv.apply(make_model("vit"), [pv.config("lora", r=4),
                                         pv.config("shpeft", data=batches(), fraction=0.2)])
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, AdapterLayer) and isinstance(qkv.base_layer, SparseDeltaLayer)
    randomize(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    y = outputs(model, "vit")
    pv.merge(model)
    torch.testing.assert_close(outputs(model, "vit"), y, rtol=1e-4, atol=1e-5)
    pv.unmerge(model)
    for n, p in model.named_parameters():  # LoRA's own unmerge is W + BA - BA: fp32 rounding
        torch.testing.assert_close(p, weights[n], rtol=1e-5, atol=1e-6)
    pv.save_adapter(model, tmp_path)
    assert torch.equal(outputs(pv.load_adapter(make_model("vit"), tmp_path), "vit"), y)


def test_unet_with_a_loss_fn(tmp_path):
    model = pv.apply(make_model("unet"), "shpeft", data=batches("unet", n=2), count=500,
                     loss_fn=unet_loss)
    assert pv.report(model).trainable == 500
    randomize(model)
    pv.save_adapter(model, tmp_path)
    assert torch.equal(outputs(model, "unet"), outputs(pv.load_adapter(make_model("unet"), tmp_path), "unet"))


def test_corrupt_indices_are_refused():
    model = applied("vit", "shpeft")
    layer, name = next((m, n) for m in sparse_layers(model).values() for n in m.names
                       if m.indices(n).numel() > 1)
    idx = getattr(layer, f"indices_{name}")
    good = idx.clone()
    for bad in (good.flip(0), good.clamp(max=0), good + layer.target(name).numel(), good - good.max() - 1):
        idx.copy_(bad)
        with pytest.raises(CorruptAdapterError, match="sorted unique"):
            outputs(model, "vit")
    idx.copy_(good)
    outputs(model, "vit")


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["shpeft", "spt"])
@pytest.mark.parametrize("opts,match", [
    (dict(fraction=0.0), "fraction"), (dict(fraction=1.5), "fraction"),
    (dict(fraction=-0.1), "fraction"), (dict(fraction=float("nan")), "fraction"),
    (dict(count=0), "count"), (dict(count=1.5), "count"),
    (dict(fraction=0.1, count=10), "not both"), (dict(batches=0), "batches"),
    (dict(loss_fn="ce"), "loss_fn"), (dict(data=torch.zeros(3)), "iterable"),
    (dict(data=5), "iterable"), (dict(scope=3), "targets"),
])
def test_invalid_options(method, opts, match):
    opts = {"data": batches(), **opts}
    model = make_model("vit")
    snap = Snapshot(model)
    with pytest.raises(pv.PeftVisionError, match=match):
        pv.apply(model, method, **opts)
    snap.assert_unchanged(model)


@pytest.mark.parametrize("opts,match", [
    (dict(estimator="l3"), "estimator"), (dict(lam=-1.0), "lam"), (dict(lam=float("inf")), "lam")])
def test_invalid_shpeft_options(opts, match):
    with pytest.raises(ConfigError, match=match):
        pv.config("shpeft", data=batches(), **opts)


@pytest.mark.parametrize("opts,match", [
    (dict(r=0), "r"), (dict(alpha=0.0), "alpha"), (dict(beta=-1.0), "beta"),
    (dict(lora_alpha=0), "lora_alpha")])
def test_invalid_spt_options(opts, match):
    with pytest.raises(ConfigError, match=match):
        pv.config("spt", data=batches(), **opts)


def _no_dependence(out, target):
    return torch.tensor(1.0, requires_grad=True)


@pytest.mark.parametrize("method", ["shpeft", "spt"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("opts,match", [
    (dict(data=[]), "no batches"),
    (dict(data=iter(())), "no batches"),
    (dict(), "pass data"),
    (dict(loss_fn=lambda out, t: out.sum() * 0.0), "no gradient reached"),
    (dict(loss_fn=lambda out, t: torch.tensor(1.0)), "does not depend"),
    (dict(loss_fn=_no_dependence), "no gradient reached"),
    (dict(loss_fn=lambda out, t: out.sum() * float("nan")), "batch 0"),
    (dict(loss_fn=lambda out, t: out), "scalar"),
    (dict(data=[torch.zeros(2, 3, 32, 32)]), r"\(inputs, targets\)"),
    (dict(count=10**9), "exceeds"),
    (dict(scope=["no_such_module"]), "match no"),
])
def test_bad_data_leaves_the_model_untouched(method, arch, opts, match):
    opts = {"data": batches(arch), **opts}
    if match == "pass data":
        opts.pop("data")
    model = make_model(arch).train()
    next(model.parameters()).grad = torch.ones_like(next(model.parameters()))  # a stale .grad
    snap = Snapshot(model)
    with pytest.raises(pv.PeftVisionError, match=match):
        pv.apply(model, method, **opts)
    snap.assert_unchanged(model)


def test_a_failed_apply_restores_the_config():
    data = batches()
    cfg = pv.config("shpeft", data=data, fraction=0.05)
    model = make_model("vit")
    with pytest.raises(pv.TargetError):
        pv.apply(model, [cfg, pv.config("lora", targets=["no_such_layer"])])
    assert cfg.data is data and cfg.selection is None
    assert pv.applied(model) is None


def test_config_serialises_without_runtime_fields():
    cfg = pv.config("spt", data=batches(), loss_fn=F.cross_entropy, fraction=0.02)
    assert {"data", "loss_fn"}.isdisjoint(cfg.to_dict())
    json.dumps(cfg.to_dict())
    assert "spt" in pv.methods() and "shpeft" in pv.methods()


@pytest.mark.parametrize("out_f, in_f", [(7, 40), (40, 7), (9, 9)])
def test_sampled_pattern_equals_the_dense_gradient_at_the_entries(out_f, in_f):
    # both orientations (Wᵀ's pattern when in > out) give gradᵀ·x at the flat indices, in order
    torch.manual_seed(0)
    idx = torch.randperm(out_f * in_f)[: out_f * in_f // 5].sort().values.to(torch.int32)
    grad, x = torch.randn(11, out_f, dtype=torch.float64), torch.randn(11, in_f, dtype=torch.float64)
    pattern = SampledPattern(idx, torch.Size((out_f, in_f)))
    assert pattern.transposed == (in_f > out_f)
    expected = (grad.T @ x).reshape(-1)[idx.long()]
    torch.testing.assert_close(pattern.grad(grad, x), expected, rtol=1e-12, atol=1e-12)


def test_sampled_pattern_is_built_once_per_selection(monkeypatch):
    layer = SparseDeltaLayer(nn.Linear(30, 20), {"weight": torch.arange(0, 600, 50)})
    built, original = [], SampledPattern.__init__

    def counting(self, *args):
        built.append(1)
        original(self, *args)

    monkeypatch.setattr(SampledPattern, "__init__", counting)
    x = torch.randn(4, 30)
    for _ in range(3):
        layer(x).sum().backward()
    assert len(built) == 1 and layer.values_weight.grad is not None
    with torch.no_grad():
        layer.indices_weight.copy_(torch.arange(1, 600, 50))  # load_adapter fills them: rebuilt
    layer(x).sum().backward()
    assert len(built) == 2
