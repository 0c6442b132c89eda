"""SV-Diff's state on the real SD-1.5 UNet configuration: the UNet, the kept SVD factors and δ,
counted from tensor sizes. On the meta device no weight or SVD is computed (seconds); the
conditioning check then counts every layer as well-conditioned, which the slow test verifies on
a built (random-init) UNet with its real SVDs."""

from __future__ import annotations

import pytest
import torch

import peftvision as pv


def _state_ratio(model, factors: str) -> float:
    """(UNet + SV-Diff's buffers and δ) bytes over the bare UNet's."""
    base = sum(t.numel() * t.element_size() for t in model.parameters())
    pv.apply(model, "svdiff", factors=factors)
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / base


@pytest.mark.parametrize("factors, expected", [("both", 2.26), ("auto", 1.46), ("one", 1.26)])
def test_sd15_state_against_the_unet(factors, expected):
    # "both" is the layout before issue 16 (U and Vᵀ of every layer beside W): 4.3 GB over 3.4
    ratio = _state_ratio(pv.create_model("sd15-unet", meta=True), factors)
    assert ratio == pytest.approx(expected, abs=0.005)  # the figures in svdiff.py's docstring
    if factors != "both":
        assert ratio <= 1.5  # issue 16's limit


@pytest.mark.slow
def test_sd15_state_with_real_svds():
    # minutes of SVD on a CPU (17 min on the shared 2-core machine). Measured 1.486x: layers with
    # σ_max/σ_min > CONDITION_LIMIT keep both factors, so the real count sits above the meta one
    torch.manual_seed(0)
    ratio = _state_ratio(pv.create_model("sd15-unet"), "auto")
    assert 1.458 <= ratio <= 1.5
