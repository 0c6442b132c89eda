"""`accelerate launch` with two CPU processes (gloo): the benchmark runner's result is the one
process's result. Test metrics are gathered from both shards (the whole test set, padding
dropped), and with each process's batch half the single process's, the trained weights match.

accelerate 1.15's `--cpu --num_processes 2` starts ONE process (its simple launcher); two CPU
processes come from `--multi_gpu` (torchrun) with no GPU visible, which accelerate runs on CPU
with gloo. The test checks that it really ran two."""

import json
import pickle

import numpy as np
import pytest
import torch
from launch import launch_two, needs_launcher

from benchmarks.demo_data import write_medmnist
from benchmarks.images import EpochRandomSampler, ImageDataset, SampleKey


def test_training_flips_are_a_function_of_the_sampler_key():
    from benchmarks.data import load_dataset

    split = load_dataset("demo:4").splits["train"]
    ds = ImageDataset(split, 16, (0.5,) * 3, (0.5,) * 3, train=True)
    torch.manual_seed(0)
    a = [ds[SampleKey(i, 0, 1)][0] for i in range(len(ds))]
    torch.manual_seed(123)  # another global RNG state, another order: the same images
    b = {i: ds[SampleKey(i, 0, 1)][0] for i in reversed(range(len(ds)))}
    assert all(torch.equal(a[i], b[i]) for i in range(len(ds)))
    plain = ImageDataset(split, 16, (0.5,) * 3, (0.5,) * 3)[0][0]
    flipped = sum(not torch.equal(ds[SampleKey(0, 0, e)][0], plain) for e in range(1, 41))
    assert 5 < flipped < 35  # about half of the epochs flip image 0
    sampler = EpochRandomSampler(6, torch.Generator().manual_seed(0), seed=7)
    first, second = list(sampler), list(sampler)
    assert {k.epoch for k in first} == {1} and {k.epoch for k in second} == {2} and {k.seed for k in first} == {7}
    assert sorted(first) == list(range(6)) and first != second
    assert torch.arange(6)[first[0]] == int(first[0])  # any dataset indexes with a key as an int
    assert pickle.loads(pickle.dumps(first[0])).epoch == 1  # keys travel to loader workers


@pytest.mark.slow  # two launched processes importing torch: about a minute on 2 shared cores
@needs_launcher
def test_accelerate_launch_two_cpu_processes_gives_the_single_process_result(tmp_path):
    from safetensors.torch import load_file

    from benchmarks.train import RunConfig, run_experiment

    # 32 training images: batches of 8 per process = 16 per step, as one process's batch of 16;
    # 9 test images: uneven shards (5 + 4, one padded), so a per-shard F1 or a padded one shows
    data = write_medmnist(tmp_path / "tex.npz", sizes=(32, 8, 9))
    common = ["--dataset", f"medmnist:{data}", "--model", "tiny-vit", "--method", "lora", "--no-pretrained",
              "--epochs", "2", "--image-size", "32", "--lr", "0.01", "--patience", "0",
              "--warmup-epochs", "0", "--quiet"]
    launch_two(["run", *common, "--batch-size", "8", "--out", str(tmp_path / "two")], timeout=600)
    [path] = list((tmp_path / "two").rglob("result.json"))  # written once, by the main process
    two = json.loads(path.read_text())
    assert two["environment"]["hardware"]["num_processes"] == 2

    one = run_experiment(RunConfig(dataset=f"medmnist:{data}", model="tiny-vit", method="lora",
                                   pretrained=False, epochs=2, image_size=32, lr=0.01, patience=0,
                                   warmup_epochs=0, batch_size=16, quiet=True, device="cpu",
                                   out=str(tmp_path / "one")))
    t1, t2 = one["metrics"]["test"], two["metrics"]["test"]
    assert t2["n"] == 9 and np.sum(t2["confusion_matrix"]) == 9  # the whole test set, once each
    assert t2["confusion_matrix"] == t1["confusion_matrix"]
    assert t2["macro_f1"] == pytest.approx(t1["macro_f1"], abs=1e-9)
    assert t2["auroc"] == pytest.approx(t1["auroc"], abs=1e-6)
    w1 = load_file(next((tmp_path / "one").rglob("adapter_model.safetensors")))
    w2 = load_file(path.parent / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    # gloo's all-reduce sums in another order than one process's batch: float32 rounding only
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
