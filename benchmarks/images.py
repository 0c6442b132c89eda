"""Pixels: where images are stored (arrays or files), RGB conversion, the torch dataset."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .data import Split

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"}


class DataError(ValueError):
    """A dataset that cannot be used as given (missing path, empty class, unreadable image...)."""


class ArrayStore:
    """Images held in a (N, H, W) or (N, H, W, C) uint8 array."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def image(self, i: int):
        from PIL import Image

        a = self.array[i]
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        return Image.fromarray(np.ascontiguousarray(a))


class FileStore:
    """Images in files under `root`, opened on access."""

    def __init__(self, paths: list[Path], root: Path):
        self.paths = paths
        self.root = root

    def image(self, i: int):
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im.load()
                return im
        except Exception as e:  # PIL raises several types for broken files
            raise DataError(f"cannot read image {path}: {e}") from e


def _decode_error(path: Path) -> str | None:
    """None when the whole image decodes, else why not. Decoding every pixel (not just the header)
    catches truncated files, which would otherwise fail when first read: for a test image, after
    the last epoch."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return None
    except Exception as e:  # PIL raises several types for broken files
        return f"{path} ({type(e).__name__}: {e})"


def check_readable(paths: list[Path]) -> None:
    """Decode every image now, so a broken or truncated file fails before training, not in epoch 7
    or at the test. Threads, since PIL decodes without the GIL; a progress bar on a terminal
    (peftvision.progress: PEFTVISION_PROGRESS=0/1 hides/forces it)."""
    from peftvision.progress import progress

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        errors = list(progress(pool.map(_decode_error, paths), "checking images", total=len(paths),
                               unit="img"))
    bad = [e for e in errors if e is not None]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} unreadable image file(s): {'; '.join(bad[:5])}{more}. "
                        "Re-export or remove them (and from the CSV list, if any), then run again")


def to_uint8(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    lo, hi = a.min(), a.max()
    return ((a - lo) / (hi - lo or 1) * 255).round().astype(np.uint8)


# -- pixels --------------------------------------------------------------------------------------
def to_rgb(im):
    """Any PIL mode -> RGB: grey replicated to three channels; 16-bit and float images rescaled
    to 8 bits by their own range; alpha dropped."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        im = Image.fromarray(to_uint8(np.asarray(im)))
    return im.convert("RGB")


class ImageDataset:
    """A torch map-style dataset over one split: (image (3, S, S) float, label) pairs.

    Images are resized (bilinear, to a square) and normalised with the model's mean/std;
    `train=True` adds a random horizontal flip. Indexed with EpochRandomSampler's SampleKeys, the
    flip is a function of (seed, epoch, index) alone, so it does not depend on which process or
    loader worker reads the image (`accelerate launch` with several processes flips what one
    process would); a plain int index draws from torch's RNG. Resized images are cached as uint8
    when the whole split fits in `cache_bytes` (default 1 GiB)."""

    def __init__(self, split: Split, image_size: int, mean, std, train: bool = False,
                 cache_bytes: int = 1 << 30):
        import torch

        self.split, self.size, self.train = split, image_size, train
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        fits = len(split) * image_size * image_size * 3 <= cache_bytes
        self.cache: dict[int, np.ndarray] | None = {} if fits else None

    def __len__(self) -> int:
        return len(self.split)

    def pixels(self, i: int) -> np.ndarray:
        """(S, S, 3) uint8 of item i."""
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        from PIL import Image

        im = to_rgb(self.split.store.image(int(self.split.indices[i])))
        if im.size != (self.size, self.size):
            im = im.resize((self.size, self.size), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
        if self.cache is not None:
            self.cache[i] = a
        return a

    def __getitem__(self, i: int):
        import torch

        x = torch.from_numpy(self.pixels(i).copy()).permute(2, 0, 1).float().div_(255)  # (3, S, S)
        if self.train:
            u = key_rng(i).random() if isinstance(i, SampleKey) else torch.rand(()).item()
            if u < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std, int(self.split.labels[i])


class SampleKey(int):
    """A dataset index that also carries the run seed and the epoch: any dataset indexes with it as
    an int; augmenting datasets draw from key_rng(key) instead of a process's global RNG."""

    def __new__(cls, index: int, seed: int, epoch: int) -> SampleKey:
        key = super().__new__(cls, index)
        key.seed, key.epoch = seed, epoch
        return key

    def __reduce__(self):  # pickled to loader workers with its seed and epoch
        return SampleKey, (int(self), self.seed, self.epoch)


def key_rng(key: SampleKey) -> np.random.Generator:
    return np.random.default_rng((key.seed, key.epoch, int(key)))


class EpochRandomSampler:
    """A seeded shuffle yielding SampleKeys: the training loader's sampler. The order comes from
    `generator` (accelerate keeps it in step across processes and shards the batches); the keys
    let a dataset draw a sample's augmentation from (seed, epoch, index) alone."""

    def __init__(self, n: int, generator, seed: int):
        self.n, self.generator, self.seed, self.epoch = n, generator, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import torch

        self.epoch += 1
        for i in torch.randperm(self.n, generator=self.generator).tolist():
            yield SampleKey(i, self.seed, self.epoch)
