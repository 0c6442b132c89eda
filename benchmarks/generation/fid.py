"""FID of generated vs held-out real images with torchmetrics' FrechetInceptionDistance.

Two feature extractors, reported under different metric names so they are never compared:
- `fid_inception`: the standard InceptionV3 pool features (2048-d; needs torch-fidelity and the
  FID Inception weights, downloaded once or given with --inception-weights);
- `fid_offline_features`: a small fixed random conv net (seeded), for offline smoke runs and
  tests. Its values only compare runs that use it; they are not FID in the literature's sense.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from peftvision.progress import progress

OFFLINE_SEED = 1234


class OfflineFeatures(nn.Module):
    """(N, 3, H, W) uint8 -> (N, 64) features from a frozen, seeded random conv net."""

    num_features = 64  # torchmetrics reads this instead of probing with a 299x299 image

    def __init__(self, size: int = 64):
        super().__init__()
        self.size = size
        with torch.random.fork_rng():
            torch.manual_seed(OFFLINE_SEED)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> OfflineFeatures:
        return super().train(False)  # always a fixed function

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                      antialias=True, align_corners=False)  # (N, 3, 64, 64)
        return self.net(x * 2 - 1)  # (N, 64)


def make_fid(features: str = "auto", inception_weights: str | None = None):
    """(metric name, FrechetInceptionDistance) for features 'inception', 'offline' or 'auto'
    (Inception when it can be loaded, else the offline features with a warning).
    The metric never syncs across processes: under `accelerate launch` the main process alone
    holds every real and generated image, and a sync would wait on processes that are not there."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    local = {"sync_on_compute": False}

    if features in ("inception", "auto"):
        try:
            return "fid_inception", FrechetInceptionDistance(
                feature=2048, feature_extractor_weights_path=inception_weights, **local)
        except Exception as exc:  # no torch-fidelity, no network for the weights, ...
            if features == "inception":
                raise SystemExit(f"FID Inception features unavailable ({exc}); pip install "
                                 "torch-fidelity and go online once, or pass --inception-weights "
                                 "FILE, or use --fid-features offline") from exc
            warnings.warn(f"InceptionV3 unavailable ({type(exc).__name__}: {exc}); reporting "
                          "fid_offline_features (random conv features), not comparable to FID",
                          stacklevel=2)
    elif features != "offline":
        raise ValueError(f"features must be 'inception', 'offline' or 'auto', got {features!r}")
    return "fid_offline_features", FrechetInceptionDistance(feature=OfflineFeatures(), **local)


@torch.no_grad()
def compute_fid(real: torch.Tensor, fake: torch.Tensor, metric, batch_size: int = 64) -> float:
    """FID between (N, 3, H, W) uint8 real and fake images (each set needs >= 2 images)."""
    metric.reset()
    for images, is_real in ((real, True), (fake, False)):
        desc = f"FID features ({'real' if is_real else 'generated'})"
        for i in progress(range(0, len(images), batch_size), desc, unit="batch"):
            metric.update(images[i:i + batch_size].to(metric.device), real=is_real)
    return float(metric.compute())
