"""Optional timm augmentation (`RunConfig(augment="timm")`, `--augment timm`), so runs can line up
with common PETL recipes. The default ("paper") stays what the papers describe: resize to a
square, normalise, random horizontal flip (benchmarks/images.py).

timm recipe here: training = RandomResizedCrop + flip + RandAugment (rand-m9-mstd0.5-inc1) +
random erasing 0.25 (timm.data.create_transform's ImageNet defaults); evaluation = resize and
centre crop at crop_pct 1.0 (the whole image: medical findings may sit at the border).
"""

from __future__ import annotations

AUGMENTS = ("paper", "timm")


class TimmImageDataset:
    """(image (3, S, S) float, label) pairs of one split through timm's transforms."""

    def __init__(self, split, image_size: int, mean, std, train: bool = False):
        from timm.data import create_transform

        self.split = split
        kwargs = dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25) if train else dict(crop_pct=1.0)
        self.transform = create_transform(image_size, is_training=train, mean=tuple(mean), std=tuple(std),
                                          **kwargs)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        import random

        import torch

        from .images import SampleKey, key_rng, to_rgb

        im = to_rgb(self.split.store.image(int(self.split.indices[i])))
        if not isinstance(i, SampleKey):
            return self.transform(im), int(self.split.labels[i])
        # the augmentation is a function of (seed, epoch, index), whichever process or worker
        # loads the image; the global RNGs timm draws from are put back afterwards
        state = random.getstate()
        try:
            with torch.random.fork_rng():
                seed = int(key_rng(i).integers(2**31))
                random.seed(seed)
                torch.manual_seed(seed)
                return self.transform(im), int(self.split.labels[i])
        finally:
            random.setstate(state)
