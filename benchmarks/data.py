"""Datasets for the benchmarks: where the images come from, how they are split, how they load.

    demo[:PER_CLASS]        generated textures (benchmarks/demo_data.py), no files needed
    medmnist:FILE.npz       MedMNIST arrays (train/val/test_images, *_labels): the official split
    medmnist:NAME           downloaded by the optional `medmnist` package (needs network)
    imagefolder:DIR         DIR/<class>/<image>; or DIR/{train,val,test}/<class>/<image> (official)
    csv:FILE                rows of path,label (header names path|image|image_path|file|filename and
                            label|class|target); paths relative to FILE; an optional split column

Without an official split, a stratified train/val/test split is drawn with `split_seed`.
Images of any mode and size are converted to RGB (grey replicated) and resized to a square.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import IMAGE_SUFFIXES, ArrayStore, DataError, FileStore, check_readable, to_uint8

SPLITS = ("train", "val", "test")
SMALL = 5000  # datasets up to this many images record their split indices in the result


@dataclass
class Split:
    store: ArrayStore | FileStore
    indices: np.ndarray  # (n,) positions in the store
    labels: np.ndarray  # (n,) class ids

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, keep: np.ndarray) -> Split:
        return Split(self.store, self.indices[keep], self.labels[keep])


@dataclass
class Data:
    name: str  # short name for tables and run names, e.g. "busi"
    spec: str
    classes: list[str]
    splits: dict[str, Split]
    official_split: bool
    split_seed: int | None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        """What the result JSON records about the split: sizes per class, the seed, and for
        small sets the indices (positions in the sorted file list / the arrays)."""
        info: dict = {"official": self.official_split, "seed": self.split_seed, "sizes": {},
                      "per_class": {}}
        for key, split in self.splits.items():
            info["sizes"][key] = len(split)
            counts = np.bincount(split.labels, minlength=self.num_classes)
            info["per_class"][key] = {c: int(n) for c, n in zip(self.classes, counts)}
        if sum(info["sizes"].values()) <= SMALL:
            info["indices"] = {k: s.indices.tolist() for k, s in self.splits.items()}
            info["indices_refer_to"] = ("the sorted file list (files_sha256)" if self.files_sha256()
                                        else "the arrays of each split" if self.official_split
                                        else "the generated images")
        if self.files_sha256():
            info["files_sha256"] = self.files_sha256()
        return info

    def files_sha256(self) -> str | None:
        """sha256 (16 hex digits) of the file list as relative paths, so a result says which
        listing its indices refer to; None for arrays."""
        store = next(iter(self.splits.values())).store
        if not isinstance(store, FileStore):
            return None
        base = store.root if store.root.is_dir() else store.root.parent
        names = [os.path.relpath(p, base) for p in store.paths]
        return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


# -- splits --------------------------------------------------------------------------------------
def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Split positions 0..N-1 per class by `fractions` (e.g. val/test; train takes the rest).

    Each class gets round(n·f) items per named split, at least one where the class has an item
    left for train; sorted index arrays; the same seed always gives the same split."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("train", *fractions)}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for key, f in fractions.items():
            left = len(idx) - start - 1  # keep one for train
            take = min(left, max(1, round(len(idx) * f))) if left > 0 and f > 0 else 0
            out[key].append(idx[start:start + take])
            start += take
        out["train"].append(idx[start:])
    return {k: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for k, v in out.items()}


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of a stratified `fraction` of `labels`: round(n·f) per class, at least 1."""
    if not 0 < fraction <= 1:
        raise DataError(f"data fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:max(1, round((labels == c).sum() * fraction))]
            for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


# -- loaders -------------------------------------------------------------------------------------
def spec_name(spec: str) -> str:
    """A dataset's short name from its spec alone: demo, the folder name, or the file stem."""
    kind, _, arg = spec.partition(":")
    if kind == "demo" or not arg:
        return kind
    p = Path(os.path.expanduser(arg.rstrip("/")))
    return p.name if kind == "imagefolder" else p.stem


def load_dataset(spec: str, *, split_seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, data_root: str | None = None) -> Data:
    """Parse a dataset spec (see the module docstring) and load its index (not the pixels)."""
    kind, _, arg = spec.partition(":")
    fractions = {"val": val_fraction, "test": test_fraction}
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"val/test fractions {val_fraction}/{test_fraction} must leave data for training")
    if kind == "demo":
        from .demo_data import make_demo

        images, labels, classes = make_demo(int(arg) if arg else None)
        return _from_arrays("demo", spec, images, labels, classes, fractions, split_seed)
    if not arg:
        raise DataError(f"dataset {spec!r}: expected demo, medmnist:PATH.npz, imagefolder:DIR or csv:FILE")
    if kind == "medmnist":
        return _medmnist(spec, arg, data_root)
    if kind == "imagefolder":
        return _imagefolder(spec, _existing(arg, "directory"), fractions, split_seed)
    if kind == "csv":
        return _csv(spec, _existing(arg, "file"), fractions, split_seed)
    raise DataError(f"unknown dataset kind {kind!r} in {spec!r}; use demo, medmnist:, imagefolder: or csv:")


def _existing(path: str, what: str) -> Path:
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise DataError(f"dataset {what} not found: {p}")
    if what == "directory" and not p.is_dir():
        raise DataError(f"expected a directory of class folders, got a file: {p}")
    return p


def _from_arrays(name, spec, images, labels, classes, fractions, seed) -> Data:
    store = ArrayStore(images)
    parts = stratified_split(labels, fractions, seed)
    splits = {k: Split(store, parts[k], labels[parts[k]]) for k in SPLITS}
    return Data(name, spec, classes, splits, official_split=False, split_seed=seed)


def _files(paths: list[Path], labels: list[int], keys: list[str] | None, classes: list[str],
           root: Path, spec: str, fractions: dict, seed: int) -> Data:
    check_readable(paths)
    store = FileStore(paths, root)
    y = np.asarray(labels, dtype=np.int64)
    if keys is None:
        parts, official = stratified_split(y, fractions, seed), False
    else:
        k = np.asarray(keys)
        parts, official = {s: np.flatnonzero(k == s) for s in SPLITS}, True
        for s in ("train", "test"):
            if len(parts[s]) == 0:
                raise DataError(f"{spec}: the official split has no {s!r} images")
        if len(parts["val"]) == 0:  # no official validation split: carve one from train
            sub = stratified_split(y[parts["train"]], {"val": fractions["val"]}, seed)
            parts["val"], parts["train"] = parts["train"][sub["val"]], parts["train"][sub["train"]]
    splits = {s: Split(store, parts[s], y[parts[s]]) for s in SPLITS}
    return Data(spec_name(spec), spec, classes, splits, official_split=official, split_seed=seed)


def _class_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{root} has no class folders (expected {root}/<class>/<image files>)")
    return dirs


def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith(".") and p.is_file())


def _imagefolder(spec: str, root: Path, fractions: dict, seed: int) -> Data:
    official = (root / "train").is_dir() and (root / "test").is_dir()
    parts = [s for s in SPLITS if (root / s).is_dir()] if official else [None]
    classes = sorted({d.name for s in parts for d in _class_dirs(root / s if s else root)})
    paths, labels, keys = [], [], []
    for s in parts:
        for d in _class_dirs(root / s if s else root):
            files = _images_in(d)
            if not files:
                raise DataError(f"class folder {d} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths += files
            labels += [classes.index(d.name)] * len(files)
            keys += [s] * len(files)
    return _files(paths, labels, keys if official else None, classes, root, spec, fractions, seed)


PATH_COLUMNS = ("path", "image", "image_path", "file", "filename", "img")
LABEL_COLUMNS = ("label", "class", "target", "diagnosis", "dx")


def _csv(spec: str, file: Path, fractions: dict, seed: int) -> Data:
    with open(file, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{file} is empty")
    header = [c.strip().lower() for c in rows[0]]
    if any(h in PATH_COLUMNS for h in header):
        pcol = next(header.index(h) for h in PATH_COLUMNS if h in header)
        lcol = next((header.index(h) for h in LABEL_COLUMNS if h in header), None)
        if lcol is None:
            raise DataError(f"{file}: no label column (one of {', '.join(LABEL_COLUMNS)}) in {rows[0]}")
        scol = header.index("split") if "split" in header else None
        rows = rows[1:]
    else:  # no header: path,label[,split]
        pcol, lcol, scol = 0, 1, 2 if len(rows[0]) > 2 else None
    try:
        paths = [(file.parent / r[pcol].strip()).resolve() for r in rows]
        raw = [r[lcol].strip() for r in rows]
        keys = [r[scol].strip().lower() for r in rows] if scol is not None else None
    except IndexError as e:
        raise DataError(f"{file}: a row has fewer columns than the header") from e
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{file}: {len(missing)} listed image(s) not found, e.g. {missing[0]}")
    if keys is not None and set(keys) - set(SPLITS):
        raise DataError(f"{file}: split values must be train/val/test, got {sorted(set(keys) - set(SPLITS))}")
    numeric = all(v.lstrip("-").isdigit() for v in raw)
    classes = sorted(set(raw), key=(lambda v: int(v)) if numeric else None)
    labels = [classes.index(v) for v in raw]
    return _files(paths, labels, keys, classes, file, spec, fractions, seed)


def _medmnist(spec: str, arg: str, data_root: str | None) -> Data:
    path = Path(os.path.expanduser(arg))
    if path.suffix != ".npz":
        path = _download_medmnist(arg, data_root)
    elif not path.is_file():
        raise DataError(f"MedMNIST file not found: {path}")
    try:
        npz = np.load(path)
        arrays = {k: npz[k] for k in npz.files}
    except Exception as e:
        raise DataError(f"cannot read {path} as a MedMNIST .npz: {e}") from e
    need = [f"{s}_{t}" for s in SPLITS for t in ("images", "labels")]
    if set(need) - set(arrays):
        raise DataError(f"{path} lacks {sorted(set(need) - set(arrays))} (MedMNIST format: {', '.join(need)})")
    splits, all_labels = {}, []
    for s in SPLITS:
        images, labels = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise DataError(f"{path}: multi-label targets {labels.shape} are not supported (single-label only)")
        if images.ndim == 4 and images.shape[-1] not in (1, 3, 4) or images.ndim not in (3, 4):
            raise DataError(f"{path}: {s}_images has shape {images.shape}; only 2D images "
                            "(N,H,W) or (N,H,W,C) are supported, not 3D volumes")
        labels = _npz_labels(path, s, images, labels)
        if images.dtype != np.uint8:
            images = to_uint8(images)
        all_labels.append(labels)
        splits[s] = Split(ArrayStore(images), np.arange(len(labels)), labels)
    k = int(max(lab.max(initial=0) for lab in all_labels)) + 1
    return Data(spec_name(spec), spec, _medmnist_classes(path.stem, k), splits, official_split=True,
                split_seed=None)


def _npz_labels(path: Path, split: str, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """{split}_labels as (N,) int64 class ids, or a DataError naming the array and the fix: an
    empty split, a count that differs from the images', float or negative labels would otherwise
    crash mid-run or, worse, train and write an empty result (n=0) that enters the tables."""
    where = f"{path}: {split}_labels"
    if len(images) == 0:
        raise DataError(f"{path}: {split}_images is empty (shape {images.shape}); every split needs "
                        "images: re-export the file with train, val and test images")
    if labels.ndim not in (1, 2) or len(labels) != len(images):
        raise DataError(f"{where} has shape {labels.shape} but {split}_images has {len(images)} images; "
                        f"save one label per image ({len(images)},) or ({len(images)}, 1)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where} has dtype {labels.dtype}; labels must be integer class ids 0..K-1 "
                        "(save them with labels.astype(np.int64))")
    labels = labels.reshape(-1).astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{where} has negative labels ({int(labels.min())}, e.g. -1 for 'unknown'); "
                        "class ids must be 0..K-1: drop those images or give them a class")
    return labels


def _medmnist_classes(stem: str, k: int) -> list[str]:
    """Class names from the medmnist package where installed; else "0".."K-1"."""
    try:
        from medmnist import INFO  # optional
        names = INFO[stem.split("_")[0]]["label"]
        return [names[str(i)] for i in range(k)]
    except Exception:
        return [str(i) for i in range(k)]


def _download_medmnist(name: str, data_root: str | None) -> Path:
    try:
        import medmnist  # optional, and needs network
    except ImportError as e:
        raise DataError(f"medmnist:{name} is not a .npz file; downloading it needs the `medmnist` package "
                        "(pip install medmnist) and network. Or pass medmnist:PATH.npz") from e
    flag, _, size = name.lower().partition("_")
    info = medmnist.INFO.get(flag)
    if info is None:
        raise DataError(f"unknown MedMNIST dataset {flag!r}; known: {', '.join(sorted(medmnist.INFO))}")
    root = Path(data_root or Path.home() / ".medmnist")
    root.mkdir(parents=True, exist_ok=True)
    cls = getattr(medmnist, info["python_class"])
    kwargs = {"size": int(size)} if size else {}
    cls(split="train", root=str(root), download=True, **kwargs)
    return root / (f"{flag}_{size}.npz" if size else f"{flag}.npz")
