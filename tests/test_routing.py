"""Per-sample adapter routing (issue 13, item 5): pv.adapter_per_sample.

For every method that supports it, two adapters of that method with non-zero weights, a third of
another kind and None (the base model) mixed in one batch give, row by row, what running each
sample alone with its adapter active gives.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import BATCH, ZOO, zoo_inputs, zoo_model, zoo_run
from test_named_adapters import perturb
from torch import nn

import peftvision as pv
from peftvision.architectures import get_architecture
from peftvision.registry import _REGISTRY, _ensure_builtin_methods
from peftvision.targets import detect_architecture

_ensure_builtin_methods()
FAMILIES = ("vit", "resnet", "unet")
PARTNER = {"vit": "lora", "resnet": "bias", "unet": "lora", "swinv2": "layernorm"}  # a third adapter of another kind
NAMES = ["a", "b", None, "a", "c", "b"]  # three copies of the zoo's batch of 2
SWAPPED = ["b", "a", "a", None, "b", "c"]  # another adapter for every sample
PAIR = ["a", "b", None, "b", None, "a"]  # for models with adapters a and b only
UNROUTABLE = {"vpt"}  # a sample without prompts cannot share a batch with one that has them
# why the routed batch and the per-sample loop differ at all: the base runs on 6 rows, a delta
# on 2, the loop on 1 (other matmul / conv blockings, so other rounding). fp32: 1e-5 relative,
# elementwise and to the output's scale (an element near 0 cannot hold 1e-5 of itself)
RTOL = 1e-5


def assert_matches(routed: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(routed, expected, rtol=RTOL, atol=RTOL * scale)
UNSHARED = ("img_ids", "txt_ids")
# Refused with a clear error, by design: these parents run the op with a child's tensor themselves
# (EVA, BEiT and Swin v2 attention: F.linear on qkv.weight; MaxViT: rel_pos.get_bias()), so one
# tensor serves the whole batch; Swin v2's position-bias MLP sees no batch at all
READS_QKV = ("eva", "eva02", "beit", "swinv2")
WEIGHT_ADAPTERS = ("lora", "loha", "lokr", "dora", "svdiff", "oft")


def refusal(family: str, method: str) -> str | None:
    if family in READS_QKV and method in WEIGHT_ADAPTERS:
        return "read as one weight by its parent"
    if family == "swinv2" and method in ("bias", "full", "attention"):
        return "never ran|position-bias MLP"
    if family in (*READS_QKV, "maxvit", "coatnet") and method in ("attention", "full"):
        return "never ran: its parent reads them itself"
    return None  # Flux's position ids: one per token, shared by the batch


def cells(unroutable: bool = False):
    for family in ZOO:
        arch = get_architecture(detect_architecture(zoo_model(family)))
        for name, cls in sorted(_REGISTRY.items()):
            if cls.test_facts.needs_data or not cls.runs_on(arch) or (name in UNROUTABLE) != unroutable:
                continue
            options = next(iter(cls.test_facts.variants.values()))
            marks = [] if family in FAMILIES else [pytest.mark.slow]
            yield pytest.param(family, name, options, id=f"{family}-{name}", marks=marks)


def batch_inputs(family: str, copies: int = 3) -> dict:
    """`copies` zoo batches (different seeds) stacked into one batch of copies·BATCH samples."""
    parts = [zoo_inputs(family, seed=s + 1) for s in range(copies)]

    def stack(key, values):
        first = values[0]
        if isinstance(first, dict):
            return {k: stack(k, [v[k] for v in values]) for k in first}
        if isinstance(first, torch.Tensor) and key not in UNSHARED and first.dim() and first.shape[0] == BATCH:
            return torch.cat(values)
        return first

    return {k: stack(k, [p[k] for p in parts]) for k in parts[0]}


def sample(inputs: dict, i: int) -> dict:
    def cut(key, value):
        if isinstance(value, dict):
            return {k: cut(k, v) for k, v in value.items()}
        if isinstance(value, torch.Tensor) and key not in UNSHARED and value.dim() and value.shape[0] == len(NAMES):
            return value[i:i + 1]
        return value

    return {k: cut(k, v) for k, v in inputs.items()}


def three_adapters(family: str, method: str, options: dict, partner: str | None = None) -> nn.Module:
    model = zoo_model(family)
    try:
        pv.apply(model, method, adapter_name="a", **options)
    except pv.UnsupportedArchitectureError as exc:
        pytest.skip(f"refused on this family member: {exc}")
    perturb(model, "a", 1)
    pv.apply(model, method, adapter_name="b", **options)
    perturb(model, "b", 2)
    pv.apply(model, partner or PARTNER.get(family, "bias"), adapter_name="c")
    perturb(model, "c", 3)
    return model.eval()


def loop(model: nn.Module, family: str, inputs: dict, names: list) -> torch.Tensor:
    """The reference: each sample alone, with its adapter active (None: adapters disabled)."""
    rows = []
    for i, name in enumerate(names):
        if name is None:
            with pv.disable_adapters(model):
                rows.append(zoo_run(model, sample(inputs, i)))
        else:
            pv.set_adapter(model, name)
            rows.append(zoo_run(model, sample(inputs, i)))
    return torch.cat(rows)


def state_of(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family,method,options", list(cells()))
@torch.no_grad()
def test_routed_batch_equals_the_per_sample_loop(family, method, options):
    model = three_adapters(family, method, options)
    inputs = batch_inputs(family)
    pv.set_adapter(model, "c")
    before = state_of(model)
    refused = refusal(family, method)
    if refused:
        with pytest.raises(pv.ConfigError, match=refused), pv.adapter_per_sample(model, NAMES):
            zoo_run(model, inputs)
    else:
        with pv.adapter_per_sample(model, NAMES):
            routed = zoo_run(model, inputs)
    assert pv.active_adapters(model) == ("c",)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    if refused:
        return
    expected = loop(model, family, inputs, NAMES)
    assert_matches(routed, expected)
    # every row changes with another adapter (else the test could not see a wrong route)
    other = loop(model, family, inputs, SWAPPED)
    assert all(not torch.allclose(r, o) for r, o in zip(routed, other))


@pytest.mark.parametrize("method", ["dora", "oft", "ssf", "svdiff"])
@torch.no_grad()
def test_layers_reading_their_wrapped_layer_see_their_adapters_copies(method):
    """Regression: DoRA, OFT, SSF (on a norm) and SV-Diff read the wrapped layer's weight or bias
    themselves; with a bias adapter beside them, they once read whichever adapter's bias was
    installed (the active one's) instead of their own adapter's copy."""
    model = three_adapters("vit", method, {}, partner="bias")
    pv.set_adapter(model, "c")
    inputs = batch_inputs("vit")
    with pv.adapter_per_sample(model, NAMES):
        routed = zoo_run(model, inputs)
    assert_matches(routed, loop(model, "vit", inputs, NAMES))


@pytest.mark.parametrize("family,method,options", [
    ("vit", "lora", {"use_rslora": True, "r": 4}), ("resnet", "lora", {"use_rslora": True, "r": 4}),
    ("vit", "shpeft", "data"), ("resnet", "spt", "data")])
@torch.no_grad()
def test_more_variants_route(family, method, options):
    """rsLoRA, and the data-chosen sparse methods (SH-PEFT, SPT), chosen from different data."""
    if options == "data":
        g = torch.Generator().manual_seed(5)
        data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g))
                for _ in range(2)]
        model = zoo_model(family)
        with torch.enable_grad():
            pv.apply(model, method, adapter_name="a", data=data, fraction=0.03)
            pv.apply(model, method, adapter_name="b", data=data[::-1], fraction=0.03)
        perturb(model, "a", 1)
        perturb(model, "b", 2)
        model.eval()
    else:
        model = three_adapters(family, method, options)
    inputs = batch_inputs(family)
    with pv.adapter_per_sample(model, PAIR):
        routed = zoo_run(model, inputs)
    assert_matches(routed, loop(model, family, inputs, PAIR))
    other = loop(model, family, inputs, [{"a": "b", "b": None, None: "a"}[n] for n in PAIR])
    assert all(not torch.allclose(r, o) for r, o in zip(routed, other))


@pytest.mark.parametrize("family,method,options", [
    pytest.param(*p.values, marks=p.marks, id=p.id) for p in cells(unroutable=True)])
def test_vpt_mixed_with_the_base_model_is_refused(family, method, options):
    model = three_adapters(family, method, options)
    with pytest.raises(pv.ConfigError, match="VPT changes the sequence length"):
        with pv.adapter_per_sample(model, NAMES):
            zoo_run(model, batch_inputs(family))
    assert pv.active_adapters(model) == ("a",)


@torch.no_grad()
def test_vpt_adapters_with_the_same_prompts_route():
    family = "vit"
    model = three_adapters(family, "vpt", {"mode": "deep", "tokens": 3})
    inputs = batch_inputs(family)
    names = ["a", "b", "b", "a", "a", "b"]
    with pv.adapter_per_sample(model, names):
        routed = zoo_run(model, inputs)
    assert_matches(routed, loop(model, family, inputs, names))


def lora_pair(family: str = "vit") -> nn.Module:
    model = zoo_model(family)
    pv.apply(model, "lora", adapter_name="a")
    perturb(model, "a", 1)
    pv.apply(model, "lora", adapter_name="b")
    perturb(model, "b", 2)
    return model.eval()


def test_errors_name_the_problem():
    model = lora_pair()
    x = batch_inputs("vit")
    with pytest.raises(pv.ConfigError, match="no adapter named 'z'.*adapters: \\['a', 'b'\\]"):
        with pv.adapter_per_sample(model, ["a", "z"]):
            pass
    with pytest.raises(pv.ConfigError, match="one adapter name \\(or None\\) per sample"):
        with pv.adapter_per_sample(model, "a"):
            pass
    with pytest.raises(pv.ConfigError, match="got 3 adapter names for a batch of 6"):
        with pv.adapter_per_sample(model, ["a", "b", None]):
            zoo_run(model, x)
    with pytest.raises(pv.ConfigError, match="already routed"):
        with pv.adapter_per_sample(model, PAIR), pv.adapter_per_sample(model, PAIR):
            pass
    pv.merge(model)
    with pytest.raises(pv.MergeError, match="unmerge"):
        with pv.adapter_per_sample(model, PAIR):
            pass
    pv.unmerge(model)
    assert pv.active_adapters(model) == ("a",)


def test_a_layer_called_without_the_batch_names_the_fix():
    """forward_features bypasses the model's batch check: a routed layer still catches it."""
    model = lora_pair()
    with pytest.raises(pv.ConfigError, match="leading dimension \\(6,\\) for a batch of 4 names"):
        with pv.adapter_per_sample(model, ["a", "b", None, "a"]):
            model.forward_features(batch_inputs("vit")["x"])


def test_batchnorm_in_train_mode_is_refused():
    model = lora_pair("resnet").train()
    with pytest.raises(pv.ConfigError, match="BatchNorm in train mode.*model.eval\\(\\)"):
        with pv.adapter_per_sample(model, PAIR):
            pass


@pytest.mark.parametrize("method", ["lora", "oft"])
def test_a_parent_reading_the_adapted_weight_refuses_a_mixed_batch(method):
    """timm EVA runs F.linear on qkv.weight itself: one weight cannot serve a mixed batch, but a
    batch that is all one adapter (or none) still gives that adapter's outputs. (Regression: OFT's
    own `weight` property once gave the rotated weight to every sample of a mixed batch.)"""
    base = zoo_model("eva").eval()
    model = pv.apply(copy.deepcopy(base), method, adapter_name="a", train_head=False)
    perturb(model, "a", 1)
    inputs = batch_inputs("eva")
    with pytest.raises(pv.ConfigError, match="read as one weight by its parent"), torch.no_grad():
        with pv.adapter_per_sample(model, ["a"] * 3 + [None] * 3):
            zoo_run(model, inputs)
    with torch.no_grad(), pv.adapter_per_sample(model, ["a"] * 6):
        routed = zoo_run(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(routed, zoo_run(model, inputs), rtol=0, atol=0)
        with pv.adapter_per_sample(model, [None] * 6):
            torch.testing.assert_close(zoo_run(model, inputs), zoo_run(base, inputs), rtol=0, atol=0)


def test_state_is_restored_when_the_block_raises():
    model = lora_pair("resnet")
    pv.apply(model, "bias", adapter_name="c")
    perturb(model, "c", 3)
    pv.set_adapter(model, ["a", "b"])
    before = state_of(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with pv.adapter_per_sample(model, ["c", None, "a", "b", "c", "c"]):
            zoo_run(model, batch_inputs("resnet"))
            raise RuntimeError("boom")
    assert pv.active_adapters(model) == ("a", "b")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any("forward" in m.__dict__ or "route" in m.__dict__ for m in model.modules())
    assert not model._forward_pre_hooks


def test_additive_layers_compute_the_delta_on_their_own_samples_only():
    """LoRA's base runs once on the whole batch, each adapter's delta only on its own rows."""
    model = lora_pair()
    qkv = model.blocks[0].attn.qkv  # b's layer around a's around the user's Linear
    seen = {"base": []}
    for layer in (qkv, qkv.base_layer):
        original = layer.output_delta

        def spy(x, name=layer.adapter_name, original=original):
            seen[name] = x.shape[0]
            return original(x)

        layer.output_delta = spy
    qkv.weighted_layer.register_forward_hook(lambda m, args, out: seen["base"].append(args[0].shape[0]))
    with torch.no_grad(), pv.adapter_per_sample(model, PAIR):
        zoo_run(model, batch_inputs("vit"))
    assert seen == {"a": 2, "b": 2, "base": [6]}


def test_routing_with_gradients_gives_the_same_outputs_and_trains_each_adapter_on_its_samples():
    """With autograd on, the additive path adds out of place; gradients reach an adapter only
    through its own samples."""
    model = lora_pair()
    x = batch_inputs("vit")
    with torch.no_grad(), pv.adapter_per_sample(model, PAIR):
        expected = zoo_run(model, x)
    for p in model.parameters():
        p.requires_grad_(False)
    qkv = model.blocks[0].attn.qkv
    a = qkv if qkv.adapter_name == "a" else qkv.base_layer
    a.lora_B.requires_grad_(True)
    with pv.adapter_per_sample(model, PAIR):
        routed = zoo_run(model, x)
    assert_matches(routed.detach(), expected)
    rows_of_a = [i for i, n in enumerate(PAIR) if n == "a"]
    routed[[i for i in range(len(PAIR)) if i not in rows_of_a]].sum().backward(retain_graph=True)
    assert a.lora_B.grad is None or torch.count_nonzero(a.lora_B.grad) == 0
    routed[rows_of_a].sum().backward()
    assert torch.count_nonzero(a.lora_B.grad) > 0
