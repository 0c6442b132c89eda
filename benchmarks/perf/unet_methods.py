"""Training-step time of every UNet PEFT method relative to LoRA, measured in one run.

    python -m benchmarks.perf.unet_methods                   # SD-1.5 UNet, batch 1, 32x32 latents, 77x768 text
    python -m benchmarks.perf.unet_methods --tiny --steps 2  # smoke test, seconds
    python -m benchmarks.perf.unet_methods --threads 1 --steps 3 --out FILE.json

Methods: bias, norm, bias+norm+attention, lora (r=4), svdiff, difffit, full. A step is
zero_grad + forward + MSE loss + backward + AdamW step (lr 1e-4).

Paired windows: one LoRA model stays alive; each other method gets its own window in which a
LoRA step and a step of the method alternate (--warmup untimed rounds, then --steps timed ones).
A method's ratio is its median over LoRA's median *in the same window*, so load from other
processes or drift hits both sides alike; LoRA's own row pools all its timed steps. On a shared
machine, --threads 1 avoids OpenMP threads waiting for each other's descheduled partner.

Memory: every model is a structural copy of one seeded pristine UNet whose parameters it shares
(no timing depends on the weights' values), and only LoRA and one other method are alive at a
time. Full fine-tuning with AdamW needs 12 more bytes per parameter (grads and two moments:
~10 GiB for SD-1.5); when /proc/meminfo says that does not fit, `full` is timed with plain SGD
and its row says so. `apply_s` is the time peftvision.apply took (SV-Diff's SVDs run there).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import peftvision as pv

from .bias_step import Case, share_frozen_copy, unet_case
from .common import environment, git_dirty, git_sha, load_warning, mem_available_bytes, write_json

METHODS: dict[str, Any] = {
    "lora": lambda: pv.config("lora", r=4),  # the reference, alive throughout
    "bias": lambda: "bias",
    "norm": lambda: "norm",
    "bias+norm+attention": lambda: ["bias", "norm", "attention"],
    "svdiff": lambda: "svdiff",
    "difffit": lambda: "difffit",
    "full": lambda: "full",  # last: the largest optimizer state
}
ADAMW_BYTES_PER_PARAM = 12  # grad + exp_avg + exp_avg_sq (the weights themselves are shared)


class Runner:
    """One method applied to a weight-sharing copy of the pristine UNet; `step()` times a step."""

    def __init__(self, case: Case, pristine: torch.nn.Module, name: str) -> None:
        gc.collect()
        t0 = time.perf_counter()
        self.model = pv.apply(share_frozen_copy(pristine, private=set()), METHODS[name]()).train()
        self.apply_s = time.perf_counter() - t0
        self.name, self.loss, self.batch = name, case.loss, case.inputs()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in trainable)
        self.optimizer = "adamw"
        available, need = mem_available_bytes(), ADAMW_BYTES_PER_PARAM * self.trainable + (2 << 30)
        if available is not None and need > available:  # + 2 GiB of activations
            self.optimizer = f"sgd (AdamW needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} available)"
        self.opt = (torch.optim.AdamW(trainable, lr=1e-4) if self.optimizer == "adamw"
                    else torch.optim.SGD(trainable, lr=1e-4))

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.model, self.batch)
        loss.backward()
        self.opt.step()
        elapsed = time.perf_counter() - t0
        assert torch.isfinite(loss), f"{self.name}: loss is {loss.item()}"
        return elapsed


def paired_window(lora: Runner, other: Runner, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Alternate LoRA and `other` steps (the order flips every round); their timed steps."""
    lora_times, other_times = [], []
    for i in range(warmup + steps):
        pair = (lora, other) if i % 2 == 0 else (other, lora)
        times = {r.name: r.step() for r in pair}
        if i >= warmup:
            lora_times.append(times["lora"])
            other_times.append(times[other.name])
    return lora_times, other_times


def run(case: Case, names: list[str], steps: int, warmup: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    pristine = case.build()
    lora = Runner(case, pristine, "lora")
    rows, lora_all = [], []
    for name in [n for n in METHODS if n in names and n != "lora"]:
        load = os.getloadavg()[0]
        other = Runner(case, pristine, name)
        lora_times, times = paired_window(lora, other, steps, warmup)
        lora_all += lora_times
        row = {"method": name, "trainable_params": other.trainable, "apply_s": other.apply_s,
               "median_step_s": statistics.median(times), "step_times_s": times,
               "lora_median_in_window_s": statistics.median(lora_times), "lora_step_times_s": lora_times,
               "optimizer": other.optimizer, "loadavg_1m_start": load, "loadavg_1m_end": os.getloadavg()[0]}
        row["ratio_vs_lora"] = row["median_step_s"] / row["lora_median_in_window_s"]
        rows.append(row)
        print(f"[{name}] {other.trainable:,} trainable, apply {other.apply_s:.1f} s, median step "
              f"{row['median_step_s']:.3f} s vs lora {row['lora_median_in_window_s']:.3f} s: "
              f"{row['ratio_vs_lora']:.2f}x ({other.optimizer}; load {load:.1f})", flush=True)
        del other
        gc.collect()
    if not rows:  # lora alone: time it on its own
        lora_all = [lora.step() for _ in range(warmup + steps)][warmup:]
    lora_row = {"method": "lora", "trainable_params": lora.trainable, "apply_s": lora.apply_s,
                "median_step_s": statistics.median(lora_all), "step_times_s": lora_all,
                "optimizer": lora.optimizer, "ratio_vs_lora": 1.0}
    return [lora_row, *rows]


def print_table(rows: list[dict[str, Any]], config: dict[str, Any]) -> None:
    print(f"\n{config['model']} {config['block_out_channels']}, batch 1, {config['latent']}x"
          f"{config['latent']} latents, {config['text_tokens']}x{config['cross_attention_dim']} text; "
          f"{torch.get_num_threads()} threads")
    print(f"{'method':<21} {'trainable':>12} {'apply s':>8} {'median step s':>14} {'lora in window s':>17} "
          f"{'vs lora':>8}")
    for r in rows:
        note = "" if r["optimizer"] == "adamw" else f"  {r['optimizer']}"
        window = f"{r['lora_median_in_window_s']:>17.3f}" if "lora_median_in_window_s" in r else f"{'':>17}"
        print(f"{r['method']:<21} {r['trainable_params']:>12,} {r['apply_s']:>8.1f} "
              f"{r['median_step_s']:>14.3f} {window} {r['ratio_vs_lora']:>8.2f}{note}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf.unet_methods", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny UNet: a smoke test in seconds")
    p.add_argument("--steps", type=int, default=5, help="timed rounds per method (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per method first")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (lora always runs)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--out", type=Path, help="write the rows, config and environment to this JSON file")
    args = p.parse_args(argv)
    names = [m for m in args.methods.split(",") if m]
    if args.steps < 1 or args.warmup < 0 or set(names) - set(METHODS):
        p.error(f"--steps >= 1, --warmup >= 0, --methods a subset of {list(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_warning(torch.get_num_threads())
    case = unet_case(args.tiny)
    rows = run(case, names, args.steps, args.warmup)
    print_table(rows, case.config)
    if args.out:
        write_json(args.out, {
            "benchmark": "unet_methods", "command": "python -m benchmarks.perf.unet_methods " + " ".join(argv),
            "git_sha": git_sha(), "git_dirty": git_dirty(), "environment": environment(),
            "config": case.config, "steps": args.steps, "warmup": args.warmup, "rows": rows})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
