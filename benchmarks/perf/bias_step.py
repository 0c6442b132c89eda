"""Training-step time of bias tuning (BitFit) next to a frozen backbone's backward and LoRA.

    python -m benchmarks.perf.bias_step --conv-only
    python -m benchmarks.perf.bias_step --model resnet50 --steps 5 --warmup 2 --out FILE.json
    python -m benchmarks.perf.bias_step --model unet --steps 3 --warmup 1 --out FILE.json
    python -m benchmarks.perf.bias_step --tiny --steps 2 --warmup 1   # smoke test, seconds

Variants, each on a fresh copy of one seeded model, all timed in the same process:
  frozen      every backbone parameter frozen, the input requires grad: backward runs through
              every layer computing input gradients only (the floor any PEFT method pays);
              a classifier head still trains
  bias        peftvision.apply(model, "bias"), with peftvision's conv-bias fast path
              (a trainable bias is added outside the conv)
  bias-naive  the same selection with apply(..., fast_conv_bias=False), so convs compute
              their bias inside the conv
  lora        peftvision.apply(model, "lora", r=8 on ResNet block convs / r=4 on UNet attention)

A step is zero_grad + forward + loss + backward + AdamW step (lr 1e-4); the median of --steps
timed steps after --warmup untimed ones is reported; torch's thread count is left as default.
By default the variants live side by side (their frozen weights share one storage) and each
round times one step of every variant, in rotating order, so drift and other load on the machine
hit all variants alike; --sequential times one variant after another instead and adds each one's
peak RSS (VmHWM, reset per variant; it includes the shared pristine model).
Before timing, the script asserts on full private copies that bias and bias-naive give the same
outputs and the same bias gradients, and that one step of either changes only bias parameters
(and the classifier head, which trains in every variant).

--conv-only times the backward of a single 320-channel 3x3 conv (1, 320, 32, 32), the case that
motivated the fast path: PyTorch's CPU conv backward computes the weight gradient whenever the
bias needs one, even with the weight frozen.

--out FILE.json merges into FILE: rows of the models measured now replace that file's rows for
the same model (and the same --tiny setting); the file refuses a merge from another environment.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import peftvision as pv

from .common import environment
from .common import git_sha as _git_sha
from .common import median as _median
from .common import reset_peak_rss as _reset_peak_rss
from .common import rss_mb as _rss_mb

SEED = 0
RTOL, ATOL = 1e-4, 1e-5  # fp32: the two bias paths differ only in where one add is rounded
VARIANTS = ("frozen", "bias", "bias-naive", "lora")
BIAS_VARIANTS = ("bias", "bias-naive")


# ---- (1) the single-conv measurement --------------------------------------------------------

def conv_only(reps: int, warmup: int, channels: int = 320, size: int = 32) -> list[dict[str, Any]]:
    """Backward time of one 3x3 conv whose input requires grad, for where the bias trains."""
    torch.manual_seed(SEED)
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    x = torch.randn(1, channels, size, size, requires_grad=True)  # (1, C, H, W)
    grad_out = torch.randn(1, channels, size, size)

    def inside(x: Tensor) -> Tensor:
        return F.conv2d(x, conv.weight, conv.bias, padding=1)

    def outside(x: Tensor) -> Tensor:
        return F.conv2d(x, conv.weight, None, padding=1) + conv.bias.view(1, -1, 1, 1)

    cases = [  # (label, weight trains, bias trains, forward)
        ("frozen (weight+bias frozen)", False, False, inside),
        ("bias trainable, inside conv", False, True, inside),
        ("bias trainable, added outside", False, True, outside),
        ("reference: weight+bias trainable", True, True, inside),
    ]
    fwd: dict[str, list[float]] = {c[0]: [] for c in cases}
    bwd: dict[str, list[float]] = {c[0]: [] for c in cases}
    bwd_cpu: dict[str, list[float]] = {c[0]: [] for c in cases}  # CPU time, all threads
    for i in range(warmup + reps):  # the cases interleaved rep by rep, as in the model timing
        for label, weight_grad, bias_grad, forward in cases:
            conv.weight.requires_grad_(weight_grad)
            conv.bias.requires_grad_(bias_grad)
            x.grad = conv.weight.grad = conv.bias.grad = None
            t0 = time.perf_counter()
            out = forward(x)
            t1, c1 = time.perf_counter(), time.process_time()
            out.backward(grad_out)
            t2, c2 = time.perf_counter(), time.process_time()
            assert (conv.bias.grad is not None) == bias_grad
            assert (conv.weight.grad is not None) == weight_grad
            if i >= warmup:
                fwd[label].append(t1 - t0)
                bwd[label].append(t2 - t1)
                bwd_cpu[label].append(c2 - c1)
    rows = [{"case": label, "weight_grad": w, "bias_grad": b,
             "forward_median_s": _median(fwd[label]), "backward_median_s": _median(bwd[label]),
             "backward_cpu_median_s": _median(bwd_cpu[label]),
             "backward_times_s": bwd[label]} for label, w, b, _ in cases]
    frozen = rows[0]["backward_median_s"]
    for row in rows:
        row["backward_ratio_vs_frozen"] = row["backward_median_s"] / frozen
    return rows


def print_conv_only(rows: list[dict[str, Any]], reps: int) -> None:
    print(f"\nConv2d(320, 320, 3, padding=1) on (1, 320, 32, 32), input requires grad; "
          f"median of {reps} reps, {torch.get_num_threads()} threads")
    print(f"{'case':<34} {'backward ms':>12} {'vs frozen':>10} {'forward ms':>11} "
          f"{'bwd CPU ms':>11}")
    for r in rows:
        print(f"{r['case']:<34} {1e3 * r['backward_median_s']:>12.2f} "
              f"{r['backward_ratio_vs_frozen']:>10.2f} {1e3 * r['forward_median_s']:>11.2f} "
              f"{1e3 * r['backward_cpu_median_s']:>11.2f}")
    inside, outside = rows[1]["backward_median_s"], rows[2]["backward_median_s"]
    print(f"bias outside vs inside: {outside / inside:.2f}x the backward time "
          f"({1e3 * (inside - outside):+.2f} ms saved)")


# ---- (2) whole-model training steps ---------------------------------------------------------

@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Tensor]]  # seeded, the same every call
    loss: Callable[[nn.Module, dict[str, Tensor]], Tensor]
    output: Callable[[nn.Module, dict[str, Tensor]], Tensor]
    grad_input: str  # the input that requires grad in the frozen variant
    lora_r: int
    config: dict[str, Any] = field(default_factory=dict)


def _seeded_inputs(make: Callable[[], dict[str, Tensor]]) -> Callable[[], dict[str, Tensor]]:
    def inputs() -> dict[str, Tensor]:
        with torch.random.fork_rng():  # leaves the global RNG as it was
            torch.manual_seed(SEED + 1)
            return make()
    return inputs


def resnet_case(tiny: bool) -> Case:
    import timm
    from timm.models.resnet import Bottleneck, ResNet

    if tiny:
        batch, size, classes = 2, 32, 10
        config = {"model": "ResNet(Bottleneck, (1,1,1,1))", "channels": (8, 16, 32, 64),
                  "stem_width": 8, "num_classes": classes, "batch": batch, "image": size}

        def build() -> nn.Module:
            return ResNet(Bottleneck, (1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8,
                          num_classes=classes)
    else:
        batch, size, classes = 8, 224, 1000
        config = {"model": "timm resnet50", "pretrained": False, "num_classes": classes,
                  "batch": batch, "image": size}

        def build() -> nn.Module:
            return timm.create_model("resnet50", pretrained=False, num_classes=classes)

    return classifier_case("resnet50-tiny" if tiny else "resnet50", build, batch, size, classes, config)


def classifier_case(name: str, build, batch: int, size: int, classes: int, config: dict) -> Case:
    """An image classifier on random (B, 3, size, size) images with cross-entropy, LoRA r=8."""

    def make() -> dict[str, Tensor]:
        return {"x": torch.randn(batch, 3, size, size),  # (B, 3, H, W)
                "y": torch.randint(0, classes, (batch,))}

    def output(model: nn.Module, b: dict[str, Tensor]) -> Tensor:
        return model(b["x"])  # (B, classes)

    def loss(model: nn.Module, b: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(output(model, b), b["y"])

    return Case(name, build, _seeded_inputs(make), loss, output, grad_input="x", lora_r=8,
                config={**config, "loss": "cross_entropy"})


def unet_case(tiny: bool) -> Case:
    from diffusers import UNet2DConditionModel

    if tiny:
        kwargs = dict(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
                      norm_num_groups=8, attention_head_dim=8, sample_size=8,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        latent, tokens = 16, 8
    else:  # Stable Diffusion 1.5; the default block types are SD's
        kwargs = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                      cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        latent, tokens = 32, 77
    kwargs.update(in_channels=4, out_channels=4)
    width = kwargs["cross_attention_dim"]

    def build() -> nn.Module:
        return UNet2DConditionModel(**kwargs)

    def make() -> dict[str, Tensor]:
        return {"sample": torch.randn(1, 4, latent, latent),  # (B, 4, h, w) latents
                "timestep": torch.tensor([500]),
                "text": torch.randn(1, tokens, width),  # (B, T, D) text embeddings
                "target": torch.randn(1, 4, latent, latent)}

    def output(model: nn.Module, b: dict[str, Tensor]) -> Tensor:
        return model(b["sample"], b["timestep"], encoder_hidden_states=b["text"]).sample

    def loss(model: nn.Module, b: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(output(model, b), b["target"])

    config = {"model": "diffusers UNet2DConditionModel", **kwargs, "batch": 1,
              "latent": latent, "text_tokens": tokens, "loss": "mse vs random target"}
    return Case("unet-tiny" if tiny else "unet-sd15", build, _seeded_inputs(make), loss, output,
                grad_input="sample", lora_r=4, config=config)


def prepare(model: nn.Module, variant: str, case: Case) -> nn.Module:
    if variant == "frozen":
        model.requires_grad_(False)
        head = getattr(model, "get_classifier", lambda: None)()
        if head is not None:
            head.requires_grad_(True)  # classification: the head trains, as in every variant
        return model
    if variant in BIAS_VARIANTS:  # bias-naive: the fast path off, bias computed inside each conv
        return pv.apply(model, "bias", fast_conv_bias=variant != "bias-naive")
    if variant == "lora":
        return pv.apply(model, "lora", r=case.lora_r)
    raise ValueError(variant)


def _count_decoupled(model: nn.Module) -> int:
    return sum(type(m).__name__.startswith("BiasDecoupled") for m in model.modules())


def _head_names(model: nn.Module) -> set[str]:
    head = getattr(model, "get_classifier", lambda: None)()
    if head is None:
        return set()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def check_bias_variants(case: Case, pristine: nn.Module) -> int:
    """Assert that bias and bias-naive give the same outputs and bias gradients, and that one
    AdamW step of either changes only bias parameters (and the head). Runs on full private
    copies, so a change to any parameter would show. Returns how many parameters changed."""
    batch = case.inputs()
    head = _head_names(pristine)
    before = dict(pristine.named_parameters())
    outputs, grads, changed = {}, {}, []
    for variant in BIAS_VARIANTS:
        model = prepare(copy.deepcopy(pristine), variant, case)
        model.eval()  # no BatchNorm statistics update, no dropout
        with torch.no_grad():
            outputs[variant] = case.output(model, batch)
        model.train()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        wrong = [n for n, _ in trainable if not n.endswith(".bias") and n not in head]
        assert not wrong, f"{case.name}/{variant}: non-bias parameters train: {wrong[:5]}"
        opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-4)
        case.loss(model, batch).backward()
        grads[variant] = {n: p.grad.clone() for n, p in trainable}
        opt.step()
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        bad = [n for n in changed if not n.endswith(".bias") and n not in head]
        assert not bad, f"{case.name}/{variant}: one step changed non-bias parameters {bad[:5]}"
        assert any(n.endswith(".bias") and n not in head for n in changed), \
            f"{case.name}/{variant}: one step changed no bias parameter"
        del model, opt
        gc.collect()
    torch.testing.assert_close(
        outputs["bias"], outputs["bias-naive"], rtol=RTOL, atol=ATOL,
        msg=lambda m: f"{case.name}: bias vs bias-naive outputs differ\n{m}")
    g_fast, g_naive = grads["bias"], grads["bias-naive"]
    assert g_fast.keys() == g_naive.keys(), f"{case.name}: the bias variants train other parameters"
    for name in g_fast:
        # atol scaled to the gradient's size: bias grads are sums over positions, not O(1)
        scale = max(1.0, g_naive[name].abs().max().item())
        torch.testing.assert_close(
            g_fast[name], g_naive[name], rtol=RTOL, atol=ATOL * scale,
            msg=lambda m, n=name: f"{case.name}: gradient of {n} differs\n{m}")
    return len(changed)


def share_frozen_copy(pristine: nn.Module, private: set[str]) -> nn.Module:
    """A deepcopy of `pristine` whose parameters not named in `private` share its storage.

    No variant trains those (they are checked to stay frozen), so the four variants of the
    860M-parameter UNet fit in memory together and can be timed interleaved."""
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad)
                            for n, p in pristine.named_parameters() if n not in private}
    return copy.deepcopy(pristine, memo)


class Runner:
    """One variant's model, optimizer and batch; `step()` times one training step."""

    def __init__(self, case: Case, pristine: nn.Module, variant: str, private: set[str]) -> None:
        self.variant = variant
        self.model = prepare(share_frozen_copy(pristine, private), variant, case).train()
        self.loss = case.loss
        self.batch = case.inputs()
        self.x = self.batch[case.grad_input]
        if variant == "frozen":
            self.x.requires_grad_(True)  # backward through every layer, input grads only
        shared = {p.data_ptr() for n, p in pristine.named_parameters() if n not in private}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        assert not any(p.data_ptr() in shared for p in trainable), \
            f"{case.name}/{variant}: a trainable parameter shares storage with the other variants"
        self.opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
        self.times: list[tuple[float, float]] = []  # (wall, CPU) seconds per timed step
        self.row: dict[str, Any] = {
            "model": case.name, "variant": variant,
            "trainable_params": sum(p.numel() for p in trainable),
            "total_params": sum(p.numel() for p in self.model.parameters()),
            "decoupled_convs": _count_decoupled(self.model)}

    def step(self) -> tuple[float, float]:
        """One training step; (wall-clock, process CPU time over all threads) in seconds."""
        t0, c0 = time.perf_counter(), time.process_time()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        self.x.grad = None
        self.loss(self.model, self.batch).backward()
        if self.opt is not None:
            self.opt.step()
        return time.perf_counter() - t0, time.process_time() - c0


def run_case(case: Case, steps: int, warmup: int, sequential: bool) -> list[dict[str, Any]]:
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    pristine = case.build().train()
    pristine.requires_grad_(True)
    print(f"[{case.name}] built in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    n_changed = check_bias_variants(case, pristine)
    print(f"[{case.name}] checks passed in {time.perf_counter() - t0:.1f} s: bias == bias-naive "
          f"outputs and bias grads (rtol {RTOL}, atol {ATOL}); one step changed only biases"
          f"{' and the head' if _head_names(pristine) else ''} ({n_changed} parameters)",
          flush=True)

    biases = {n for n, _ in pristine.named_parameters() if n.endswith(".bias")}
    private = biases | _head_names(pristine)  # the only parameters any variant trains
    rows = []
    if sequential:  # one variant after another: per-variant peak RSS, but exposed to drift
        for variant in VARIANTS:
            gc.collect()
            rss_before, peak_ok = _rss_mb("VmRSS"), _reset_peak_rss()
            runner = Runner(case, pristine, variant, private)
            runner.times = [runner.step() for _ in range(warmup + steps)][warmup:]
            peak = _rss_mb("VmHWM") if peak_ok else None
            rows.append({**runner.row, "times": runner.times, "rss_before_mb": rss_before,
                         "peak_rss_mb": peak})
            del runner
    else:  # all variants alive, one step of each per round in rotating order: drift and other
        # load on the machine hit every variant alike
        runners = [Runner(case, pristine, v, private) for v in VARIANTS]
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            for runner in runners[i % len(runners):] + runners[:i % len(runners)]:
                t = runner.step()
                if i >= warmup:
                    runner.times.append(t)
            print(f"[{case.name}] round {i + 1}/{warmup + steps}"
                  f"{' (warmup)' if i < warmup else ''}: {time.perf_counter() - t0:.1f} s",
                  flush=True)
        rows = [{**r.row, "times": r.times, "rss_before_mb": None, "peak_rss_mb": None}
                for r in runners]
        del runners
    load_end = os.getloadavg()
    by = {r["variant"]: _median([w for w, _ in r["times"]]) for r in rows}
    for r in rows:
        times = r.pop("times")
        r.update(median_step_s=by[r["variant"]], step_times_s=[w for w, _ in times],
                 median_cpu_s=_median([c for _, c in times]), step_cpu_s=[c for _, c in times],
                 steps=steps, warmup=warmup,
                 schedule="sequential" if sequential else "interleaved",
                 ratio_vs_frozen=by[r["variant"]] / by["frozen"],
                 ratio_vs_lora=by[r["variant"]] / by["lora"],
                 loadavg_1m_start=load_start[0], loadavg_1m_end=load_end[0], config=case.config)
    del pristine
    gc.collect()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'model':<14} {'variant':<11} {'trainable':>12} {'median s':>9} {'vs frozen':>9} "
          f"{'vs lora':>8} {'fast convs':>10} {'peak RSS MiB':>12} {'CPU s':>8}")
    for r in rows:
        peak = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "n/a"
        print(f"{r['model']:<14} {r['variant']:<11} {r['trainable_params']:>12,} "
              f"{r['median_step_s']:>9.4f} {r['ratio_vs_frozen']:>9.2f} {r['ratio_vs_lora']:>8.2f} "
              f"{r['decoupled_convs']:>10} {peak:>12} {r.get('median_cpu_s', float('nan')):>8.3f}")


# ---- results file ---------------------------------------------------------------------------

def existing_results(path: Path, env: dict[str, Any]) -> dict[str, Any] | None:
    """The results already in `path` (None if there are none); refuses another benchmark's file
    or one written in another environment, so rows of one file stay comparable."""
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    if old.get("benchmark") != "bias_step":
        raise SystemExit(f"{path} is not a bias_step results file; not overwriting it")
    if old.get("environment") != env:
        raise SystemExit(f"{path} was written in another environment {old.get('environment')}; "
                         f"use another --out (this one: {env})")
    return old


def write_results(path: Path, rows: list[dict[str, Any]], conv: list[dict[str, Any]] | None,
                  argv: list[str]) -> None:
    env = environment()
    stamp = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "git_sha": _git_sha(),
             "command": "python -m benchmarks.perf.bias_step " + " ".join(argv)}
    data = existing_results(path, env) or {"benchmark": "bias_step", "environment": env,
                                           "conv_only": None, "rows": []}
    if conv is not None:
        data["conv_only"] = {**stamp, "rows": conv}
    measured = {r["model"] for r in rows}
    data["rows"] = [r for r in data["rows"] if r["model"] not in measured]
    data["rows"] += [{**r, **stamp} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf.bias_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("resnet50", "unet", "all"), default="all")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps per variant before the timed ones")
    p.add_argument("--tiny", action="store_true", help="tiny configs: a smoke test in seconds")
    p.add_argument("--conv-only", action="store_true", help="only the single 320-ch conv backward")
    p.add_argument("--conv-reps", type=int, default=50, help="timed reps for --conv-only")
    p.add_argument("--sequential", action="store_true",
                   help="time variants one after another (adds per-variant peak RSS) instead of "
                        "interleaving their steps")
    p.add_argument("--out", type=Path, help="merge the rows into this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.out:
        existing_results(args.out, environment())  # refuse a bad --out before the long run

    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load:.2f}", flush=True)
    if load > 0.5 * (os.cpu_count() or 1):
        print("warning: the machine is busy; absolute times are inflated, compare the ratios",
              flush=True)
    if args.conv_only:
        conv = conv_only(args.conv_reps, warmup=5)
        print_conv_only(conv, args.conv_reps)
        if args.out:
            write_results(args.out, [], conv, argv)
        return

    builders = {"resnet50": resnet_case, "unet": unet_case}
    names = list(builders) if args.model == "all" else [args.model]
    rows = []
    for name in names:
        rows += run_case(builders[name](args.tiny), args.steps, args.warmup, args.sequential)
    print_table(rows)
    if args.out:
        write_results(args.out, rows, None, argv)


if __name__ == "__main__":
    main()
