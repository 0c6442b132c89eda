"""The generated dataset behind `--dataset demo`: four texture classes, learnable but not trivial.

    gratings   a sinusoidal grating at any angle
    checkers   a product of two gratings (a rotated checkerboard)
    rings      concentric rings around a random centre
    blobs      a few Gaussian blobs at random places

Every image draws its own frequency, phase, orientation, contrast and brightness, and gets
Gaussian noise of random strength, so the classes overlap near the noise floor (rings seen far
from their centre look like gratings; low-frequency checkers look like blobs). Half the images are
grey, half tinted in a random colour. The same parameters always give the same images (their own
seed, independent of the run's seed), so every run sees one fixed dataset.
"""

from __future__ import annotations

import numpy as np

CLASSES = ["gratings", "checkers", "rings", "blobs"]
PER_CLASS = 108  # 432 images: ~302 train / 43 val / 87 test with the default 70/10/20 split
SIZE = 32
SEED = 20240703


def _pattern(kind: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """One (S, S) pattern in [-1, 1]; coordinates in [0, 1)."""
    freq = rng.uniform(2.0, 6.0)  # cycles across the image
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == 0:
        return np.sin(2 * np.pi * freq * u + phase)
    if kind == 1:
        return np.sin(2 * np.pi * freq * u + phase) * np.sin(2 * np.pi * freq * v + rng.uniform(0, 2 * np.pi))
    if kind == 2:
        cy, cx = rng.uniform(-0.2, 1.2, size=2)
        r = np.hypot(yy - cy, xx - cx)
        return np.sin(2 * np.pi * freq * r + phase)
    img = np.zeros_like(xx)
    for _ in range(rng.integers(2, 6)):
        cy, cx = rng.uniform(0, 1, size=2)
        s = rng.uniform(0.05, 0.15)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return img / max(img.max(), 1e-6) * 2 - 1


def make_demo(per_class: int | None = None, size: int = SIZE, seed: int = SEED):
    """(images (N, S, S, 3) uint8, labels (N,) int64, class names)."""
    per_class = per_class or PER_CLASS
    if per_class < 3:
        raise ValueError(f"demo needs at least 3 images per class, got {per_class}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    images = np.empty((per_class * len(CLASSES), size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    for i, kind in enumerate(labels):
        p = _pattern(int(kind), rng, yy, xx)
        contrast, brightness = rng.uniform(0.2, 0.45), rng.uniform(0.35, 0.65)
        noise = rng.normal(0, rng.uniform(0.05, 0.25), size=(size, size))
        grey = brightness + contrast * p + noise  # (S, S)
        tint = np.ones(3) if rng.random() < 0.5 else rng.uniform(0.4, 1.0, size=3)
        images[i] = (np.clip(grey[..., None] * tint, 0, 1) * 255).round().astype(np.uint8)
    order = rng.permutation(len(labels))  # interleave the classes
    return images[order], labels[order].astype(np.int64), list(CLASSES)


def write_medmnist(path, sizes: tuple[int, int, int] = (64, 16, 32), size: int = SIZE):
    """The generated textures as a MedMNIST-format .npz (train/val/test_images, *_labels (N, 1)):
    `sizes` images per split, classes balanced. For smoke runs of `medmnist:FILE.npz` datasets."""
    from pathlib import Path

    total = sum(sizes)
    images, labels, _ = make_demo(-(-total // len(CLASSES)), size)
    arrays, start = {}, 0
    for split, n in zip(("train", "val", "test"), sizes):
        arrays[f"{split}_images"] = images[start:start + n]
        arrays[f"{split}_labels"] = labels[start:start + n, None]  # (N, 1) as MedMNIST stores them
        start += n
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return Path(path)
