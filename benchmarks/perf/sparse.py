"""SH-PEFT's sparse deltas against LoRA and full fine-tuning: selection time, step time, memory.

    python -m benchmarks.perf.sparse --out benchmarks/results/perf/sparse_cpu.json
    python -m benchmarks.perf.sparse --model vit_small_patch16_224 --rounds 1   # quicker
    python -m benchmarks.perf.sparse --tiny                                     # smoke test

On `--model` (default vit_base_patch16_224, pretrained=False, 7 classes) at batch `--batch`
(default 4) of 224² random images, every measurement in its own fresh process:

  select    shpeft at each --fractions (default 1% and 0.1%): apply() with `--est-batches`
            batches of data; reports the gradient pass's time per image, the whole apply
            (gradients + global top-k + wrapping), its peak RSS, k, and the saved adapter's size;
  train     lora (r=8 on qkv, the library default), full fine-tuning, and shpeft at each
            fraction, loaded from the adapter `select` saved (load_adapter: no data). A step is
            zero_grad + forward + cross-entropy + backward + AdamW step; median wall-clock and
            process CPU time (all threads; less sensitive to other load on a shared machine) of
            --steps after --warmup. Peak training memory: the process's peak RSS (VmHWM, reset right before
            the first step, after gc + malloc_trim) and that peak minus the RSS before training
            (what training itself adds: activations, gradients, optimizer state, temporaries).
            shpeft runs also assert that no base weight changed and that the values moved.
--rounds 2 (default) runs the train processes twice, the second round in reverse order, and
reports per variant the median over all its timed steps, so drift hits all variants alike.
Targets (the issue): shpeft 1% peak training memory <= 1.1x LoRA's; step <= 1.3x LoRA's;
the 1% adapter file < 7 MB (10^6 bytes).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import peftvision as pv

SEED = 0
CLASSES = 7
TARGETS = {"memory_vs_lora": 1.1, "step_vs_lora": 1.3, "adapter_bytes": 7_000_000}


# ---- measurement helpers --------------------------------------------------------------------

def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _settle_and_reset_peak() -> float:
    """Free what can be freed, reset VmHWM to the current RSS; returns that RSS in MiB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed pages otherwise
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def build(model_name: str, tiny: bool) -> nn.Module:
    torch.manual_seed(SEED)
    if tiny:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                 num_classes=CLASSES)
    import timm

    return timm.create_model(model_name, pretrained=False, num_classes=CLASSES)


def batches(n: int, batch: int, size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g),  # (B, 3, H, W)
             torch.randint(0, CLASSES, (batch,), generator=g)) for _ in range(n)]


# ---- child processes --------------------------------------------------------------------------

class TimedBatches:
    """The batches, timing one full pass over them: apply's gradient pass alone (the batches
    are in memory, so the pass is the forward and backward over them)."""

    def __init__(self, batches: list) -> None:
        self.batches, self.seconds = batches, []

    def __iter__(self):
        t0 = time.perf_counter()
        yield from self.batches
        self.seconds.append(time.perf_counter() - t0)


def child_select(args: argparse.Namespace) -> dict[str, Any]:
    model = build(args.model, args.tiny)
    data = TimedBatches(batches(args.est_batches, args.batch, args.size, seed=SEED + 1))
    rss = _settle_and_reset_peak()
    t0 = time.perf_counter()
    pv.apply(model, "shpeft", data=data, fraction=args.fraction)
    apply_s = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    images = args.est_batches * args.batch
    grad_time = data.seconds
    k = sum(pv.applied(model).method("shpeft").config.selection.values())
    pv.save_adapter(model, args.adapter_dir, card=False)
    files = {p.name: p.stat().st_size for p in Path(args.adapter_dir).iterdir()}
    return {"fraction": args.fraction, "selected": k, "images": images,
            "gradient_pass_s": grad_time[0], "gradient_s_per_image": grad_time[0] / images,
            "apply_s": apply_s, "apply_s_per_image": apply_s / images,
            "rss_before_mb": rss, "peak_rss_mb": peak,
            "adapter_bytes": files["adapter_model.safetensors"],
            "config_bytes": files["adapter_config.json"],
            "trainable_params": pv.report(model).trainable}


def child_train(args: argparse.Namespace) -> dict[str, Any]:
    model = build(args.model, args.tiny)
    if args.variant == "lora":
        pv.apply(model, "lora", r=8)
    elif args.variant == "full":
        pv.apply(model, "full")
    else:
        pv.load_adapter(model, args.adapter_dir)  # the selection is in the adapter: no data
    model.train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    x, y = batches(1, args.batch, args.size, seed=SEED + 2)[0]
    values_before = [p.detach().clone() for n, p in model.named_parameters()
                     if p.requires_grad and ".values_" in n]
    rss = _settle_and_reset_peak()
    times, cpu = [], []
    for i in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak = _status_mb("VmHWM")
    row = {"variant": args.variant, "step_times_s": times, "step_cpu_s": cpu, "rss_before_mb": rss,
           "peak_rss_mb": peak, "train_added_mb": peak - rss,
           "trainable_params": sum(p.numel() for p in trainable)}
    if args.variant.startswith("shpeft"):
        now = dict(model.named_parameters())
        assert all(torch.equal(now[n], b) for n, b in base.items()), "a frozen weight changed"
        moved = [not torch.equal(a, p) for a, p in zip(values_before, (
            p for n, p in model.named_parameters() if p.requires_grad and ".values_" in n))]
        assert any(moved), "no sparse value moved"
        row["values_tensors_moved"] = f"{sum(moved)}/{len(moved)}"
    # gradients held after the step: proportional to the trainable count, never a dense weight
    row["grad_numel"] = sum(p.grad.numel() for p in trainable if p.grad is not None)
    with tempfile.TemporaryDirectory() as tmp:
        pv.save_adapter(model, tmp, card=False)
        row["adapter_bytes"] = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    return row


# ---- parent -------------------------------------------------------------------------------------

def _child(args: argparse.Namespace, role: str, **extra: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.perf.sparse", "--child", role, "--model", args.model,
           "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--est-batches", str(args.est_batches)]
    cmd += ["--tiny"] if args.tiny else []
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    if result.returncode != 0:
        raise SystemExit(f"child {role} {extra} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="sparse_bench_"))
    selects, dirs = [], {}
    for fraction in args.fractions:
        dirs[fraction] = tmp / f"shpeft_{fraction}"
        row = _child(args, "select", fraction=fraction, adapter_dir=dirs[fraction])
        selects.append(row)
        print(f"select shpeft {fraction:g}: k={row['selected']:,}, gradients "
              f"{row['gradient_s_per_image']:.3f} s/image, apply {row['apply_s']:.1f} s, "
              f"adapter {row['adapter_bytes']:,} B, peak RSS {row['peak_rss_mb']:.0f} MiB", flush=True)
    variants = ["lora"] + [f"shpeft-{f:g}" for f in args.fractions] + ["full"]
    adapter = {f"shpeft-{f:g}": dirs[f] for f in args.fractions}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            extra = {"variant": v, **({"adapter_dir": adapter[v]} if v in adapter else {})}
            row = _child(args, "train", **extra)
            runs[v].append(row)
            print(f"round {r + 1} {v}: median step {statistics.median(row['step_times_s']):.3f} s, "
                  f"peak RSS {row['peak_rss_mb']:.0f} MiB (+{row['train_added_mb']:.0f} in training)",
                  flush=True)
    rows = []
    for v, rs in runs.items():
        rows.append({"variant": v, "trainable_params": rs[0]["trainable_params"],
                     "median_step_s": statistics.median(t for r in rs for t in r["step_times_s"]),
                     "median_cpu_s": statistics.median(t for r in rs for t in r["step_cpu_s"]),
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                     "train_added_mb": statistics.median(r["train_added_mb"] for r in rs),
                     "adapter_bytes": rs[0]["adapter_bytes"], "runs": rs})
    lora = rows[0]
    for row in rows:
        row["step_vs_lora"] = row["median_step_s"] / lora["median_step_s"]
        row["cpu_vs_lora"] = row["median_cpu_s"] / lora["median_cpu_s"]
        row["peak_vs_lora"] = row["peak_rss_mb"] / lora["peak_rss_mb"]
        row["train_added_vs_lora"] = row["train_added_mb"] / lora["train_added_mb"]
    return {"benchmark": "sparse", "model": "tiny-vit" if args.tiny else args.model,
            "batch": args.batch, "image": args.size, "classes": CLASSES,
            "select": selects, "train": rows, "targets": TARGETS,
            "environment": {"torch": torch.__version__, "peftvision": pv.__version__,
                            "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "device": "cpu"},
            "loadavg_1m_start": load_start, "loadavg_1m_end": os.getloadavg()[0],
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": _git_sha(), "command": "python -m benchmarks.perf.sparse " + " ".join(sys.argv[1:])}


def print_report(res: dict[str, Any]) -> None:
    print(f"\n{res['model']}, batch {res['batch']}, {res['image']}², "
          f"{res['environment']['torch_threads']} threads, load {res['loadavg_1m_start']:.1f}"
          f"->{res['loadavg_1m_end']:.1f}")
    print(f"{'selection':<14} {'k':>10} {'grad s/img':>10} {'apply s':>8} {'adapter B':>11} {'peak MiB':>9}")
    for s in res["select"]:
        print(f"shpeft {s['fraction']:<7g} {s['selected']:>10,} {s['gradient_s_per_image']:>10.3f} "
              f"{s['apply_s']:>8.1f} {s['adapter_bytes']:>11,} {s['peak_rss_mb']:>9.0f}")
    print(f"\n{'variant':<14} {'trainable':>11} {'step s':>7} {'vs lora':>7} {'CPU s':>7} "
          f"{'vs lora':>7} {'peak MiB':>9} {'vs lora':>7} {'train +MiB':>10} {'vs lora':>7} "
          f"{'adapter B':>11}")
    for r in res["train"]:
        print(f"{r['variant']:<14} {r['trainable_params']:>11,} {r['median_step_s']:>7.3f} "
              f"{r['step_vs_lora']:>7.2f} {r['median_cpu_s']:>7.3f} {r['cpu_vs_lora']:>7.2f} "
              f"{r['peak_rss_mb']:>9.0f} {r['peak_vs_lora']:>7.2f} "
              f"{r['train_added_mb']:>10.0f} {r['train_added_vs_lora']:>7.2f} {r['adapter_bytes']:>11,}")
    one = next((r for r in res["train"] if r["variant"] == "shpeft-0.01"), None)
    sel = next((s for s in res["select"] if s["fraction"] == 0.01), None)
    if one and sel:
        t = res["targets"]
        print(f"\ntargets, shpeft 1%: peak memory {one['peak_vs_lora']:.2f}x LoRA (<= {t['memory_vs_lora']}; "
              f"memory added by training {one['train_added_vs_lora']:.2f}x), step "
              f"{one['step_vs_lora']:.2f}x LoRA wall / {one['cpu_vs_lora']:.2f}x CPU time "
              f"(<= {t['step_vs_lora']}), adapter "
              f"{sel['adapter_bytes'] / 1e6:.2f} MB (< {t['adapter_bytes'] / 1e6:g})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf.sparse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--est-batches", type=int, default=2, help="batches of data for the selection")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.001])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a tiny ViT at 32²: a smoke test")
    p.add_argument("--out", type=Path, help="write the results JSON here")
    p.add_argument("--child", choices=("select", "train"), help=argparse.SUPPRESS)
    p.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--adapter-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.size = 32
    if args.child:
        row = child_select(args) if args.child == "select" else child_train(args)
        print(json.dumps(row))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    res = run(args)
    print_report(res)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
