"""Text-to-image training under accelerate: the random draws follow the global batch (so two
processes with batch B train what one process with batch 2B trains), bf16 autocast on CPU, fp16
on CPU refused, and `accelerate launch` with two CPU processes writing one result.

As in test_bench_accelerate.py: accelerate 1.15's `--cpu --num_processes 2` starts one process,
so two CPU processes come from `--multi_gpu` (torchrun) with no GPU visible (gloo on CPU)."""

import json
import math

import pytest
import torch
from launch import launch_two, needs_launcher

from benchmarks.generation import data as gdata
from benchmarks.generation.components import tiny_components
from benchmarks.generation.run import main
from benchmarks.generation.train import diffusion_loss, make_accelerator


def _batch(n=4, size=32):
    ds = gdata.CaptionDataset(gdata.demo_records(n, size), size)
    pixels, captions = zip(*(ds[i] for i in range(n)))
    return torch.stack(pixels), list(captions)  # (n, 3, S, S) in [-1, 1]


def test_one_process_draws_are_the_posterior_sample_then_noise_then_timesteps():
    """world=1 keeps the draws (and so the numbers) of the loss before accelerate."""
    torch.manual_seed(0)
    c = tiny_components(32)
    pixels, captions = _batch()
    loss = diffusion_loss(c, pixels, captions, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        latents = c.vae.encode(pixels).latent_dist.sample(g) * c.vae.config.scaling_factor
        text = c.text_encoder(c.tokenizer(captions, padding="max_length", truncation=True,
                                          max_length=c.tokenizer.model_max_length,
                                          return_tensors="pt").input_ids)[0]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, c.scheduler.config.num_train_timesteps, (4,), generator=g)
        pred = c.unet(c.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, noise), rtol=0, atol=0)


def test_two_ranks_halves_average_to_the_whole_batch_loss():
    torch.manual_seed(0)
    c = tiny_components(32)
    pixels, captions = _batch()
    whole = diffusion_loss(c, pixels, captions, torch.Generator().manual_seed(5))
    halves = [diffusion_loss(c, pixels[r * 2:(r + 1) * 2], captions[r * 2:(r + 1) * 2],
                             torch.Generator().manual_seed(5), rank=r, world=2) for r in (0, 1)]
    # each rank draws all 4 samples' noise and keeps its own rows: the mean of the halves is the
    # whole batch's MSE (batch-size rounding of the VAE/UNet kernels only)
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole, rtol=1e-5, atol=1e-6)
    other = diffusion_loss(c, pixels[:2], captions[:2], torch.Generator().manual_seed(5))
    assert not torch.allclose(other, halves[0])  # rank 1's draws are not rank 0's


def _run(demo_dir, out, *extra):
    return main(["--model", "tiny", "--data", f"imagefolder-with-captions:{demo_dir}", "--method", "lora",
                 "--steps", "2", "--image-size", "32", "--batch-size", "2", "--num-samples", "2",
                 "--inference-steps", "1", "--fid-features", "offline", "--device", "cpu",
                 "--out", str(out), *extra])


def test_bf16_mixed_precision_on_cpu_trains_under_autocast(tmp_path):
    demo_dir = gdata.write_demo(tmp_path / "demo", n=9, size=32)
    full = _run(demo_dir, tmp_path / "fp32", "--mixed-precision", "no")
    bf16 = _run(demo_dir, tmp_path / "bf16", "--mixed-precision", "bf16")
    assert bf16["config"]["mixed_precision"] == "bf16" and full["config"]["mixed_precision"] == "no"
    a, b = full["history"]["train_loss"], bf16["history"]["train_loss"]
    assert all(math.isfinite(x) for x in b) and math.isfinite(bf16["metrics"]["fid_offline_features"])
    # autocast ran (the losses are not bit-equal to fp32) and stayed close (measured: 2.7e-4
    # relative; bf16 keeps ~3 significant digits, hence the 1e-2 bound)
    assert b == pytest.approx(a, rel=1e-2) and a != b
    assert bf16["config"]["num_processes"] == 1


def test_auto_precision_is_none_on_cpu_and_fp16_on_cpu_is_refused():
    assert make_accelerator("cpu", "auto").mixed_precision == "no"
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU.*bf16 or no"):
        make_accelerator("cpu", "fp16")
    with pytest.raises(ValueError, match="--mixed-precision must be one of"):
        make_accelerator("cpu", "fp8")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=1 .*--device cuda"):
        make_accelerator("cuda:1", "no")  # would silently run on accelerate's own choice of GPU


def test_fid_metric_does_not_sync_across_processes():
    # regression: under a 2-process launch torchmetrics' default sync made the main process wait
    # in a barrier for the other, which had finished ("Connection closed by peer")
    from benchmarks.generation.fid import make_fid

    assert make_fid("offline")[1].sync_on_compute is False


@pytest.mark.slow  # two launched processes importing torch and diffusers: about a minute here
@needs_launcher
def test_accelerate_launch_two_cpu_processes_trains_the_single_process_adapter(tmp_path):
    from safetensors.torch import load_file

    # 15 images -> 12 train / 3 test; a global batch of 4 = 3 batches an epoch, and 5 steps cross
    # into the second epoch's shuffle, which both processes must draw alike
    demo_dir = gdata.write_demo(tmp_path / "demo", n=15, size=32)
    common = ["--model", "tiny", "--data", f"imagefolder-with-captions:{demo_dir}", "--method", "lora",
              "--steps", "5", "--lr", "0.01", "--image-size", "32", "--num-samples", "3",
              "--inference-steps", "2", "--fid-features", "offline", "--mixed-precision", "no"]
    done = launch_two(["generate", *common, "--batch-size", "2", "--out", str(tmp_path / "two")], timeout=900)
    [path] = list((tmp_path / "two").rglob("result.json"))  # written once, by the main process
    assert done.stdout.count("fid_offline_features = ") == 1  # FID computed and reported once
    two = json.loads(path.read_text())
    assert two["environment"]["hardware"]["num_processes"] == 2
    assert two["config"]["num_processes"] == 2 and two["config"]["global_batch_size"] == 4

    one = main([*common, "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "one")])
    assert one["config"]["num_processes"] == 1 and one["config"]["global_batch_size"] == 4
    w1 = load_file(next((tmp_path / "one").rglob("adapter_model.safetensors")))
    w2 = load_file(path.parent / "adapter_model.safetensors")
    assert w1.keys() == w2.keys() and w1
    # lora_B starts at zero: training moved it, so equal weights are not equal initialisations
    assert all(w1[k].abs().max() > 1e-4 for k in w1 if k.endswith("lora_B"))
    # gloo's all-reduce sums in another order than one process's batch: float32 rounding, which
    # AdamW amplifies where a gradient is near zero (its step is lr x g / sqrt(v), about lr
    # whatever |g| is). Measured here: 6 of 19,968 entries off by more than 1e-5, the worst by
    # 1.3e-4 = 1.3% of lr; the rest agree to 1e-5.
    diff = torch.cat([(w2[k] - w1[k]).abs().flatten() for k in w1])
    assert diff.max() <= 0.05 * 0.01  # 5% of one step at lr 0.01
    assert (diff > 1e-5).float().mean() < 1e-3 and diff.mean() < 1e-6
    # the global batch's loss per step, as one process sees its batch of 4
    assert two["history"]["train_loss"] == pytest.approx(one["history"]["train_loss"], rel=1e-4)
    assert two["metrics"]["num_real"] == one["metrics"]["num_real"] == 3
    assert two["metrics"]["fid_offline_features"] == pytest.approx(one["metrics"]["fid_offline_features"],
                                                                   rel=1e-3)
