"""pv.methods() reports each method's trainable count on ResNet-50 and ViT-B/L/H and the counts
its papers print; the stored counts (peftvision/method_counts.py) stay in step with the code."""

from __future__ import annotations

import math

import pytest

import peftvision as pv
from benchmarks.param_counts import needs_data
from peftvision import method_counts
from peftvision.registry import PAPER_MODELS
from tools import method_counts as generator

CHEAP = ["resnet50", "vit_base_patch16_224"]  # ViT-L/H: the slow test


def test_every_registered_method_has_stored_counts_and_no_other():
    counted = {name for name in pv.methods() if not needs_data(name)}
    assert set(method_counts.COUNTS) == counted, "run `python -m tools.method_counts`"
    assert method_counts.MODELS == tuple(PAPER_MODELS)
    assert all(len(row) == len(PAPER_MODELS) for row in method_counts.COUNTS.values())


def test_stored_counts_match_the_code_on_resnet50_and_vit_b():
    stored = {name: dict(zip(method_counts.MODELS, row)) for name, row in method_counts.COUNTS.items()}
    computed = generator.default_counts(list(stored), CHEAP)
    assert computed == {name: {m: stored[name][m] for m in CHEAP} for name in stored}, \
        "peftvision/method_counts.py is stale: run `python -m tools.method_counts`"


@pytest.mark.slow
def test_stored_counts_file_is_current():  # ViT-L and ViT-H on the meta device: ~1 minute
    assert generator.TARGET.read_text() == generator.source(), \
        "peftvision/method_counts.py is stale: run `python -m tools.method_counts`"


def test_methods_info_carries_the_counts():
    info = pv.methods()
    # LoRA's default on ViT-B: r=8 on every block's fused qkv (768 -> 2304): 12 · 8 · (768 + 2304)
    assert info["lora"].count("vit_base_patch16_224") == 12 * 8 * (768 + 3 * 768)
    # timm's ResNet-50 convs have no bias: BitFit trains the BatchNorm biases, half of what
    # `batchnorm` trains (their weights and biases)
    assert 2 * info["bias"].count("resnet50") == info["batchnorm"].count("resnet50")
    assert info["tsa"].count("vit_base_patch16_224") is None  # TSA is for ResNets
    assert info["shpeft"].counts == ()  # data-chosen
    assert dict(info["linear"].counts) == dict.fromkeys(PAPER_MODELS, 0)


def _agrees_at_printed_precision(ours: int, figure: str) -> bool:
    """0.59M vs "0.6M": rounded or truncated to the figure's decimals, ours reads as printed."""
    number = figure.rstrip("M")
    decimals = len(number.partition(".")[2])
    value = ours / 1e6 * 10**decimals
    printed = float(number) * 10**decimals
    return math.isclose(round(value), printed) or math.isclose(math.floor(value), printed)


def test_reported_counts_are_reproduced_by_the_paper_options():
    reported = [(name, r) for name, info in pv.methods().items() for r in info.reported]
    assert {name for name, _ in reported} >= {"lora", "adaptformer", "attention"}
    for name, r in reported:
        assert r.model in PAPER_MODELS and r.source
        assert r.ours is not None, f"{name} on {r.model}: run `python -m tools.method_counts`"
        assert _agrees_at_printed_precision(r.ours, r.figure), (name, r)
    assert pv.methods()["dora"].reported == ()  # LoRA's figures are not DoRA's


def test_reported_counts_on_vit_b_match_a_fresh_count():
    for name, info in pv.methods().items():
        for r in info.reported:
            if r.model == "vit_base_patch16_224":
                assert generator.parameters(r.model, name, r.options_dict()) == r.ours, name


@pytest.mark.slow
def test_meta_device_counts_equal_a_real_build():
    # the counts come from models on the meta device; a real CPU ViT-B gives the same ones
    from benchmarks.param_counts import count

    for name in ("lora", "adaptformer", "ssf", "vpt", "fact", "convpass", "oft", "svdiff"):
        real = count("vit_base_patch16_224", name, 1000, "cpu", 0)["method_params"]
        assert real == pv.methods()[name].count("vit_base_patch16_224"), name
