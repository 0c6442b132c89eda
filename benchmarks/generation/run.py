"""One text-to-image PEFT run: fine-tune the UNet, sample, FID, one result JSON.

    python -m benchmarks generate --model tiny --data demo --method lora --steps 20
    python -m benchmarks generate --model runwayml/stable-diffusion-v1-5 \\
        --data imagefolder-with-captions:../shared/data/busi --method bias+norm+attention

(`python -m benchmarks.generation ...` takes the same arguments.)
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import peftvision as pv

from .. import results
from . import data as gdata
from .components import load_components
from .fid import compute_fid, make_fid
from .sample import generate, save_grid
from .train import PRECISIONS, make_accelerator, train


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="tiny", help="tiny | Hub id | DIR with unet/ vae/ "
                   "text_encoder/ tokenizer/ scheduler/ (default: tiny)")
    p.add_argument("--data", default="demo", help="demo | imagefolder-with-captions:PATH "
                   "(PATH/captions.csv: image_path,text_caption,label) | mimic-cxr:ROOT "
                   "(MIMIC-CXR-JPG + reports)")
    p.add_argument("--method", default="lora", help="a peftvision method, several joined by '+' "
                   "(e.g. bias+norm+attention), or 'none' to sample the base model")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. r=4 (METHOD.KEY=VALUE for combinations), repeatable")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--image-size", type=int, default=None,
                   help="pixels (default: the UNet's sample_size x VAE factor: 32 tiny, 512 SD)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--num-samples", type=int, default=None,
                   help="images to generate (default: as many as held-out real images)")
    p.add_argument("--inference-steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="held-out real images for FID (stratified split, --split-seed)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=None,
                   help="training pool size before --fraction (MIMIC-CXR: whole patients, e.g. "
                        "110000 for Dutt et al. Table 4; default all)")
    p.add_argument("--test-images", type=int, default=None,
                   help="held-out images for FID (default: MIMIC-CXR 1000 of its test split, "
                        "else all of --test-fraction)")
    p.add_argument("--figure-samples", type=int, default=8,
                   help="first prompts whose images are kept for the Figure 2 grid")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="share of the training split used (stratified, --seed); the test split stays")
    p.add_argument("--fid-features", choices=("auto", "inception", "offline"), default="auto",
                   help="auto: InceptionV3 if it loads, else the offline random-conv features")
    p.add_argument("--inception-weights", default=None, help="local FID Inception weights file")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available, else cpu; "
                   "under `accelerate launch`, each process's GPU)")
    p.add_argument("--mixed-precision", choices=PRECISIONS, default="auto",
                   help="UNet training under accelerate autocast; auto: bf16 (fp16 without bf16) on "
                        "CUDA, no on CPU; fp16 needs CUDA")
    p.add_argument("--out", default="runs/generate", help="<out>/<run>/: result.json, adapter, samples.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", help="one run per seed (e.g. 0 1 2 3, Table 4's four); "
                   "the same test images and prompts for each, so FIDs compare")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def add_generation_parser(subparsers) -> argparse.ArgumentParser:
    """The `generate` subcommand for benchmarks/cli.py; `args.func(args)` runs it, returns 0."""
    p = subparsers.add_parser("generate", help="text-to-image PEFT of a Stable Diffusion UNet + FID",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_generate)
    return p


def cmd_generate(args: argparse.Namespace) -> int:
    for seed in args.seeds or [args.seed]:
        run(argparse.Namespace(**{**vars(args), "seed": seed, "seeds": None}))
    return 0


def parse_method(method: str, options: list[str]) -> tuple[list[str], list, dict]:
    """("lora", ["r=4"]) -> (["lora"], [lora config], {"r": 4}); with several methods the options are
    METHOD.KEY=VALUE (as in `python -m benchmarks run --option`). Values are JSON where they parse."""
    names = [m.strip() for m in method.replace(",", "+").split("+") if m.strip()]
    opts: dict[str, dict[str, Any]] = {n: {} for n in names}
    for item in options:
        key, sep, value = item.partition("=")
        name, dot, key = key.rpartition(".") if len(names) > 1 else (names[0], ".", key)
        if not sep or not dot or name not in opts:
            raise SystemExit(f"--option takes KEY=VALUE (METHOD.KEY=VALUE with several methods "
                             f"{names}), got {item!r}")
        try:
            opts[name][key] = json.loads(value)
        except json.JSONDecodeError:
            opts[name][key] = value
    given = opts[names[0]] if len(names) == 1 else {n: o for n, o in opts.items() if o}
    if names == ["none"]:
        return names, [], {}
    return names, [pv.config(n, **o) for n, o in opts.items()], given


def dataset_name(spec: str) -> str:
    if spec.startswith(gdata.MIMIC):
        return "mimic-cxr"
    return "demo" if spec == "demo" else Path(spec.removeprefix(gdata.PREFIX)).resolve().name


def save_samples(fake: torch.Tensor, real: torch.Tensor, prompts: list[str], run_dir: Path,
                 k: int) -> list[dict]:
    """The first k generated images (and the real test image each prompt came from) as PNGs under
    run_dir/samples/, with their prompts: what `reproduce table4` lays out as Figure 2. Image i
    has prompt i and the i-th draw of the run seed's generator, so runs with one seed and one
    test split share prompts and starting noise across methods."""
    from PIL import Image

    out = []
    (run_dir / "samples").mkdir(exist_ok=True)
    for i in range(min(k, len(fake))):
        files = {}
        for kind, images in (("generated", fake), ("real", real)):
            if i < len(images):
                rel = f"samples/{kind}_{i:03d}.png"
                Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(run_dir / rel)  # (S, S, 3)
                files[kind] = rel
        out.append({"index": i, "prompt": prompts[i], **files})
    return out


def run_dir_name(args: argparse.Namespace, names: list[str]) -> str:
    """generate__<dataset>__<model>__<method>__f1__s<seed>, beside the classification runs."""
    model = "tiny-sd" if args.model == "tiny" else (
        Path(args.model).name if Path(args.model).exists() else args.model)
    return "generate__" + results.run_name(dataset_name(args.data), model, "+".join(names), args.fraction, args.seed)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """One run; the result on the main process. Under `accelerate launch` with several processes
    every process trains on its shard of each batch (the adapters stay equal: DDP averages the
    gradients); only the main process then samples, computes FID over the whole test set and
    writes the run directory; the others return None."""
    start = time.perf_counter()
    accelerator = make_accelerator(args.device, args.mixed_precision)
    device = accelerator.device
    results.reset_peak_memory(device)
    torch.manual_seed(args.seed)
    names, configs, options = parse_method(args.method, args.option)

    train_set, test_set, split = gdata.load_split(
        args.data, test_fraction=args.test_fraction, split_seed=args.split_seed,
        train_images=args.train_images, test_images=args.test_images)
    pool = len(train_set)
    train_set = gdata.subset(train_set, args.fraction, args.seed)
    split.update(gdata.split_summary(train_set, test_set, split["test_fraction"], args.split_seed),
                 n_train_pool=pool)
    c = load_components(args.model, args.image_size or 32)
    vae_factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
    size = args.image_size or c.unet.config.sample_size * vae_factor
    for m in (c.unet, c.vae, c.text_encoder):
        m.to(device)
    if names == ["none"]:
        c.unet.requires_grad_(False)
    else:
        pv.apply(c.unet, configs)
    params = pv.report(c.unet)
    if accelerator.is_main_process:
        print(params, flush=True)

    t0 = time.perf_counter()
    # --batch-size is per process: the global batch is num_processes x it (accelerate shards
    # the loader's batches over the processes, so drop_last looks at the global batch)
    world = accelerator.num_processes
    loader = DataLoader(gdata.CaptionDataset(train_set, size), batch_size=args.batch_size,
                        shuffle=True, drop_last=len(train_set) >= args.batch_size * world,
                        generator=torch.Generator().manual_seed(args.seed))
    losses = (train(c, loader, args.steps, args.lr, device,
                    torch.Generator(device).manual_seed(args.seed), log_every=max(1, args.steps // 10),
                    accelerator=accelerator)
              if names != ["none"] and args.steps > 0 else [])
    train_s = time.perf_counter() - t0
    if not accelerator.is_main_process:
        return None

    t0 = time.perf_counter()
    n = args.num_samples or len(test_set)
    prompts = [test_set[i % len(test_set)].caption for i in range(n)]
    fake = generate(c, prompts, image_size=size, inference_steps=args.inference_steps,
                    batch_size=args.batch_size, seed=args.seed, device=device,
                    guidance_scale=args.guidance_scale)  # (n, 3, S, S) uint8
    sample_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    real = torch.stack([((gdata.to_tensor(r.image, size) + 1) * 127.5).round().to(torch.uint8)
                        for r in test_set])  # (n_test, 3, S, S) uint8
    fid_name, metric = make_fid(args.fid_features, args.inception_weights)
    fid = compute_fid(real, fake, metric.to(device), batch_size=max(args.batch_size, 32))
    fid_s = time.perf_counter() - t0

    run_dir = Path(args.out) / run_dir_name(args, names)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_grid(fake[:64], run_dir / "samples.png")
    samples = save_samples(fake, real, prompts, run_dir, args.figure_samples)
    adapter = {"run": run_dir.name, "path": None, "bytes": None}
    if names != ["none"]:
        pv.save_adapter(c.unet, run_dir, tags=["peftvision-benchmark", "text-to-image"],
                        metrics={fid_name: fid})
        adapter.update(path=str(run_dir), bytes=(run_dir / "adapter_model.safetensors").stat().st_size)
    recorded = pv.applied(c.unet)
    env = results.environment(str(device), world)
    env["versions"].update({m: version(m) for m in ("diffusers", "transformers", "torchmetrics")})
    result = {
        "kind": results.KIND, "schema": results.SCHEMA, "task": "text-to-image",
        "config": {**{k: v for k, v in vars(args).items() if k != "func"}, "image_size": size,
                   "mixed_precision": accelerator.mixed_precision, "num_processes": world,
                   "global_batch_size": args.batch_size * world},
        "method": {"label": "+".join(names), "names": names, "options": options,
                   # as apply recorded them (shpeft/spt: with the selection it chose)
                   "configs": {m.name: m.config.to_dict() for m in recorded.methods} if recorded
                   else {m.name: m.to_dict() for m in configs}},
        "dataset": {"spec": args.data, "name": dataset_name(args.data),
                    "split": split},
        "model": {"name": args.model, "pretrained": args.model != "tiny", "image_size": size,
                  "base_parameters": {k: sum(p.numel() for p in getattr(c, k).parameters())
                                      for k in ("unet", "vae", "text_encoder")}},
        "parameters": {**params.to_dict(), "method_params": params.trainable},
        "metrics": {fid_name: fid, "num_generated": n, "num_real": len(real),
                    "final_loss": losses[-1] if losses else None,
                    "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None},
        "history": {"train_loss": losses},
        "samples": samples,  # Figure 2: the first prompts' images, the same for every method
        "peak_memory": results.peak_memory(device),
        "train_time_s": train_s, "sample_time_s": sample_s, "fid_time_s": fid_s,
        "adapter": adapter,
        "environment": env,
        "wall_time_s": time.perf_counter() - start,
    }
    path = results.write_result(result, run_dir)
    print(f"{fid_name} = {fid:.4f}  ({n} generated vs {len(real)} held-out real, {size}px)  "
          f"trainable {params.trainable:,} / {params.total:,}  -> {path}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m benchmarks.generation", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(args)
