"""Image–caption data: a folder with captions.csv (BUSI) or a generated `demo` set, and its split.

    imagefolder-with-captions:PATH   PATH/captions.csv (or PATH itself a .csv) with columns
                                     image_path,text_caption,label; image_path relative to the csv
    mimic-cxr:ROOT                   MIMIC-CXR-JPG + reports (benchmarks/datasets/mimic_cxr.py):
                                     impression prompts, PhysioNet's patient split
    demo                             generated coloured shapes with templated captions (no files)

Images become (3, S, S) float tensors in [-1, 1] (what the VAE expects): the shorter side resized
to S (bicubic), then a centre crop. No random flips, so a run is a function of its seed.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

CAPTIONS_FILE = "captions.csv"
PREFIX = "imagefolder-with-captions:"


@dataclass(frozen=True)
class Record:
    name: str  # image_path as written in captions.csv, or demo/<i>: identifies the split
    image: Path | Image.Image  # a file, or an in-memory image (demo)
    caption: str
    label: str
    group: str | None = None  # records of one group (a patient) stay on one side of a split


def read_captions(source: str | Path) -> list[Record]:
    """Records from a captions.csv (or a folder holding one)."""
    path = Path(source)
    csv_path = path / CAPTIONS_FILE if path.is_dir() else path
    if not csv_path.is_file():
        raise FileNotFoundError(f"no {CAPTIONS_FILE} at {path}: expected columns "
                                "image_path,text_caption,label")
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"image_path", "text_caption", "label"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{csv_path} lacks column(s) {sorted(missing)}")
    return [Record(r["image_path"], csv_path.parent / r["image_path"], r["text_caption"], r["label"]) for r in rows]


# ---- the generated demo set: 3 shapes x 4 colours, captions in the BUSI style -----------------

SHAPES = ("circle", "square", "stripes")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "white": (235, 235, 235)}


def _draw(shape: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[:size, :size] / size  # (S, S) in [0, 1)
    cx, cy, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.18, 0.3)
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    elif shape == "square":
        mask = (abs(xx - cx) < r) & (abs(yy - cy) < r)
    else:
        mask = np.sin(xx * rng.uniform(12, 20) + yy * rng.uniform(-4, 4)) > 0
    img = rng.normal(20, 8, (size, size, 3))  # dark, noisy background like an ultrasound
    img[mask] = np.asarray(colour) + rng.normal(0, 10, (int(mask.sum()), 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def demo_records(n: int = 96, size: int = 64, seed: int = 0) -> list[Record]:
    """n generated images with captions like "An image of a red circle." (label = shape)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
        img = _draw(shape, COLOURS[colour], size, rng)
        out.append(Record(f"demo/{i}", img, f"An image of a {colour} {shape}.", shape))
    return out


def write_demo(root: str | Path, n: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Write the demo set as PNGs + captions.csv under root/<label>/ (a BUSI-shaped folder)."""
    root = Path(root)
    rows = []
    for i, rec in enumerate(demo_records(n, size, seed)):
        rel = Path(rec.label) / f"{rec.label}_{i}.png"
        (root / rel.parent).mkdir(parents=True, exist_ok=True)
        rec.image.save(root / rel)
        rows.append({"image_path": rel.as_posix(), "text_caption": rec.caption, "label": rec.label})
    with (root / CAPTIONS_FILE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_path", "text_caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def load_records(spec: str) -> list[Record]:
    """`demo` or `imagefolder-with-captions:PATH` (a bare PATH is accepted too)."""
    if spec == "demo":
        return demo_records()
    if spec.startswith(MIMIC):
        raise ValueError(f"{spec}: MIMIC-CXR comes with its own split; use load_split")
    return read_captions(spec.removeprefix(PREFIX))


MIMIC = "mimic-cxr:"


def load_split(spec: str, *, test_fraction: float = 0.2, split_seed: int = 0,
               train_images: int | None = None, test_images: int | None = None
               ) -> tuple[list[Record], list[Record], dict]:
    """(train, test, what the result records about the split) for any spec. MIMIC-CXR: PhysioNet's
    patient split, `train_images` training images by whole patients, `test_images` (default 1,000)
    test images; other data: a stratified split by `test_fraction`, capped at the given counts."""
    if spec.startswith(MIMIC):
        from ..datasets import mimic_cxr

        train, test, info = mimic_cxr.load(spec.removeprefix(MIMIC), train_images=train_images,
                                           test_images=1000 if test_images is None else test_images,
                                           seed=split_seed)
        as_record = lambda i: Record(i.dicom_id, i.path, i.prompt, i.view, i.subject_id)  # noqa: E731
        train, test = [as_record(i) for i in train], [as_record(i) for i in test]
        return train, test, {**split_summary(train, test, None, split_seed), **info}
    train, test = stratified_split(load_records(spec), test_fraction, split_seed)
    rng = random.Random(split_seed)  # a seeded sample, not the label-ordered head of the list
    train = train if train_images is None else rng.sample(train, min(train_images, len(train)))
    test = test if test_images is None else rng.sample(test, min(test_images, len(test)))
    return train, test, split_summary(train, test, test_fraction, split_seed)


# ---- split and tensors ---------------------------------------------------------------------

def stratified_split(records: list[Record], test_fraction: float = 0.2,
                     seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, test), stratified by label with a fixed seed; at least one test image per label."""
    by_label: dict[str, list[Record]] = defaultdict(list)
    for rec in records:
        by_label[rec.label].append(rec)
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda r: r.name)
        rng.shuffle(group)
        n_test = max(1, round(test_fraction * len(group))) if len(group) > 1 else 0
        test += group[:n_test]
        train += group[n_test:]
    return train, test


def subset(records: list[Record], fraction: float, seed: int = 0) -> list[Record]:
    """A stratified `fraction` of the training records (round(n·f) per label, at least one), for
    data-volume sweeps (Dutt et al. Table 4: 110K/55K/11K images); the test split stays fixed.
    Grouped records (MIMIC-CXR patients): the first round(n·f) of a seeded order of whole groups,
    so 10% is inside 50% for one seed."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(records)
    if records and records[0].group is not None:
        from ..datasets.mimic_cxr import group_prefix

        return group_prefix(records, max(1, round(fraction * len(records))), seed, lambda r: r.group)
    by_label: dict[str, list[Record]] = defaultdict(list)
    for rec in records:
        by_label[rec.label].append(rec)
    rng = random.Random(seed)
    out = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda r: r.name)
        rng.shuffle(group)
        out += group[:max(1, round(fraction * len(group)))]
    return out


def split_summary(train: list[Record], test: list[Record], test_fraction: float | None, seed: int) -> dict:
    """What the result JSON records about the split (the test list's sha256 identifies it)."""
    keys = "\n".join(sorted(r.name for r in test)).encode()
    return {"seed": seed, "test_fraction": test_fraction, "n_train": len(train), "n_test": len(test),
            "test_sha256": hashlib.sha256(keys).hexdigest()}


def to_tensor(image: Path | Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) in [-1, 1]: shorter side resized to `size`, centre crop."""
    img = (Image.open(image) if isinstance(image, Path) else image).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)  # (3, S, S)
    return x / 127.5 - 1.0


class CaptionDataset(Dataset):
    """(pixel_values (3, S, S) in [-1, 1], caption) pairs."""

    def __init__(self, records: list[Record], image_size: int):
        self.records, self.image_size = records, image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        rec = self.records[i]
        return to_tensor(rec.image, self.image_size), rec.caption
