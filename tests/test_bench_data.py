"""benchmarks/data.py + images.py: loaders on tiny fixtures (grey and colour, odd sizes), stratified
splits, data fractions, and clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.data import load_dataset, spec_name, stratified_split, stratified_subset
from benchmarks.demo_data import make_demo
from benchmarks.images import DataError, ImageDataset

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _png(path, mode="RGB", size=(13, 21), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], value * 200, dtype=np.uint16)).save(path)
    else:
        colour = (value, value // 2, 30, 255)[:len(mode)]  # RGB(A) images are not grey
        Image.new(mode, size, value if mode == "L" else colour).save(path)
    return path


def _folder(root, counts=None, modes=("RGB", "L", "RGBA", "I;16")):
    counts = counts or {"benign": 10, "malignant": 6, "normal": 4}
    for c, n in counts.items():
        for i in range(n):
            _png(root / c / f"{c} ({i}).png", modes[i % len(modes)], size=(13 + i, 21 - i % 3))
    return root


def _items(data, split="train", size=16):
    ds = ImageDataset(data.splits[split], size, MEAN, STD)
    return [ds[i] for i in range(len(ds))]


# -- splits ----------------------------------------------------------------------------------------
def test_stratified_split_keeps_class_proportions_and_is_seeded():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    parts = stratified_split(labels, {"val": 0.1, "test": 0.2}, seed=0)
    count = lambda k: np.bincount(labels[parts[k]], minlength=3).tolist()  # noqa: E731
    assert count("val") == [5, 3, 2] and count("test") == [10, 6, 4] and count("train") == [35, 21, 14]
    everything = np.concatenate(list(parts.values()))
    assert sorted(everything.tolist()) == list(range(100))  # disjoint and complete
    again = stratified_split(labels, {"val": 0.1, "test": 0.2}, seed=0)
    other = stratified_split(labels, {"val": 0.1, "test": 0.2}, seed=1)
    assert all((parts[k] == again[k]).all() for k in parts)
    assert any(not np.array_equal(parts[k], other[k]) for k in parts)


def test_stratified_split_leaves_every_class_an_image_for_training():
    labels = np.array([0] * 20 + [1, 1] + [2])
    parts = stratified_split(labels, {"val": 0.1, "test": 0.2}, seed=0)
    assert set(labels[parts["train"]]) == {0, 1, 2}
    assert np.bincount(labels[parts["test"]], minlength=3)[0] == 4


def test_stratified_subset_fractions():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    assert np.bincount(labels[stratified_subset(labels, 0.1, 0)]).tolist() == [5, 3, 2]
    assert np.bincount(labels[stratified_subset(labels, 0.01, 0)]).tolist() == [1, 1, 1]  # >= 1 each
    assert len(stratified_subset(labels, 1.0, 0)) == 100
    assert not np.array_equal(stratified_subset(labels, 0.5, 0), stratified_subset(labels, 0.5, 1))
    with pytest.raises(DataError, match="fraction"):
        stratified_subset(labels, 0.0, 0)


# -- loaders ---------------------------------------------------------------------------------------
def test_imagefolder_grey_colour_and_odd_sizes(tmp_path):
    data = load_dataset(f"imagefolder:{_folder(tmp_path / 'busi')}", split_seed=3)
    assert data.name == "busi" and data.classes == ["benign", "malignant", "normal"]
    info = data.describe()
    assert sum(info["sizes"].values()) == 20 and info["seed"] == 3 and not info["official"]
    assert info["per_class"]["test"] == {"benign": 2, "malignant": 1, "normal": 1}
    assert "indices" in info and len(info["files_sha256"]) == 16
    for x, y in _items(data):
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < 3
    train = data.splits["train"]
    ds = ImageDataset(train, 8, MEAN, STD)
    modes = [Image.open(train.store.paths[i]).mode for i in train.indices]
    for i, mode in enumerate(modes):  # grey (8 and 16 bit) replicated to RGB; colour kept
        rgb = ds.pixels(i)
        assert rgb.shape == (8, 8, 3)
        assert (rgb[..., 0] == rgb[..., 2]).all() == (mode in ("L", "I;16", "I"))
    assert {"L", "RGB", "RGBA"} <= set(modes)
    x, _ = ds[0]
    assert x.mean() != 0 and torch.allclose((x * 0.25 + 0.5) * 255, torch.tensor(
        ds.pixels(0)).permute(2, 0, 1).float(), atol=1e-3)  # normalised with the given mean/std


def test_imagefolder_with_an_official_split(tmp_path):
    _folder(tmp_path / "d" / "train", {"a": 10, "b": 10})
    _folder(tmp_path / "d" / "test", {"a": 3, "b": 2})
    data = load_dataset(f"imagefolder:{tmp_path / 'd'}")
    sizes = data.describe()["sizes"]
    assert data.official_split and sizes["test"] == 5 and sizes["val"] == 2 and sizes["train"] == 18


def test_csv_with_header_like_busi_captions(tmp_path):
    _folder(tmp_path / "imgs", {"benign": 4, "malignant": 3})
    lines = ["image_path,text_caption,label"] + [
        f"imgs/{c}/{c} ({i}).png,An image.,{c}" for c, n in (("benign", 4), ("malignant", 3)) for i in range(n)]
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    data = load_dataset(f"csv:{tmp_path / 'captions.csv'}")
    assert data.name == "captions" and data.classes == ["benign", "malignant"]
    assert sum(len(s) for s in data.splits.values()) == 7
    assert len(_items(data, "test")) == len(data.splits["test"])


def test_csv_without_header_numeric_labels_and_split_column(tmp_path):
    for i in range(6):
        _png(tmp_path / f"{i}.png", "L", size=(9, 7))
    rows = [f"{i}.png,{10 if i % 2 else 2},{'test' if i < 2 else 'train'}" for i in range(6)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    data = load_dataset(f"csv:{tmp_path / 'list.csv'}")
    assert data.classes == ["2", "10"]  # numeric order, not "10" < "2"
    assert data.official_split and len(data.splits["test"]) == 2
    assert len(data.splits["train"]) + len(data.splits["val"]) == 4


@pytest.mark.parametrize("shape", [(28, 28), (17, 23, 3), (15, 15, 1)])
def test_medmnist_npz_grey_and_colour(tmp_path, shape):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(-1, 1)
    np.savez(tmp_path / "bloodmnist.npz", **arrays)
    data = load_dataset(f"medmnist:{tmp_path / 'bloodmnist.npz'}")
    assert data.official_split and data.num_classes == 3 and data.describe()["sizes"] == {
        "train": 12, "val": 4, "test": 6}
    assert all(x.shape == (3, 16, 16) for x, _ in _items(data, "val"))


def test_demo_dataset_is_fixed_and_balanced():
    images, labels, classes = make_demo(10)
    again, _, _ = make_demo(10)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8 and len(classes) == 4
    assert np.bincount(labels).tolist() == [10] * 4 and (images == again).all()
    data = load_dataset("demo:10")
    assert data.name == "demo" and sum(data.describe()["sizes"].values()) == 40


def test_spec_names():
    assert spec_name("demo") == "demo"
    assert spec_name("imagefolder:/data/busi/") == "busi"
    assert spec_name("csv:/x/ham.csv") == "ham"
    assert spec_name("medmnist:/x/pathmnist_64.npz") == "pathmnist_64"


# -- clear errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["imagefolder:{tmp}/nope", "csv:{tmp}/nope.csv", "medmnist:{tmp}/nope.npz"])
def test_missing_path(tmp_path, spec):
    with pytest.raises(DataError, match="not found"):
        load_dataset(spec.format(tmp=tmp_path))


def test_empty_class_folder(tmp_path):
    _folder(tmp_path / "d", {"a": 3})
    (tmp_path / "d" / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder .*b has no images"):
        load_dataset(f"imagefolder:{tmp_path / 'd'}")


def test_folder_without_class_folders(tmp_path):
    _png(tmp_path / "d" / "x.png")
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(f"imagefolder:{tmp_path / 'd'}")


def test_unreadable_image_is_reported_before_training(tmp_path):
    _folder(tmp_path / "d", {"a": 3, "b": 3})
    (tmp_path / "d" / "b" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"1 unreadable image.*broken\.png"):
        load_dataset(f"imagefolder:{tmp_path / 'd'}")


def test_csv_errors(tmp_path):
    (tmp_path / "a.csv").write_text("path,label\nmissing.png,x\n")
    with pytest.raises(DataError, match="not found.*missing.png"):
        load_dataset(f"csv:{tmp_path / 'a.csv'}")
    (tmp_path / "b.csv").write_text("path,caption\nx.png,y\n")
    with pytest.raises(DataError, match="no label column"):
        load_dataset(f"csv:{tmp_path / 'b.csv'}")


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "a.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="lacks"):
        load_dataset(f"medmnist:{tmp_path / 'a.npz'}")
    multi = {f"{s}_{t}": (np.zeros((3, 4, 4), np.uint8) if t == "images" else np.zeros((3, 14)))
             for s in ("train", "val", "test") for t in ("images", "labels")}
    np.savez(tmp_path / "chest.npz", **multi)
    with pytest.raises(DataError, match="multi-label"):
        load_dataset(f"medmnist:{tmp_path / 'chest.npz'}")
    volume = {f"{s}_{t}": (np.zeros((3, 28, 28, 28), np.uint8) if t == "images" else np.zeros((3, 1)))
              for s in ("train", "val", "test") for t in ("images", "labels")}
    np.savez(tmp_path / "organ3d.npz", **volume)
    with pytest.raises(DataError, match="3D volumes"):
        load_dataset(f"medmnist:{tmp_path / 'organ3d.npz'}")


def test_unknown_spec():
    with pytest.raises(DataError, match="unknown dataset kind"):
        load_dataset("parquet:/x")
    with pytest.raises(DataError, match="expected demo"):
        load_dataset("imagefolder:")
