"""One benchmark run: data -> model -> PEFT method -> train (early stop on val macro-F1) -> test.

    from benchmarks.train import RunConfig, run_experiment
    result = run_experiment(RunConfig(dataset="demo", model="tiny-resnet", method="lora",
                                      pretrained=False, epochs=3, image_size=32))

Training: AdamW (weight decay on tensors of 2+ dims only, so biases, norms and SSF scales are not
pulled to zero), linear warmup then cosine decay per step, cross-entropy; the best epoch by
validation macro-F1 is restored for the test. Hugging Face `accelerate` places the model and
batches (one or more GPUs under `accelerate launch`, mixed precision on CUDA; plain CPU otherwise).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import peftvision as pv
from peftvision.progress import enabled as progress_enabled

from .data import load_dataset, spec_name, stratified_subset
from .heads import HEADS, set_head
from .heartbeat import Heartbeat
from .images import DataError, EpochRandomSampler, ImageDataset
from .metrics import classification_metrics
from .models import (
    build_model,
    data_config,
    default_image_size,
    load_weights,
    method_configs,
    method_names,
    needs_data,
)
from .results import (
    config_digest,
    environment,
    peak_memory,
    reset_peak_memory,
    run_name,
    write_result,
)
from .timm_augment import AUGMENTS, TimmImageDataset


@dataclass
class RunConfig:
    dataset: str            # "demo" | "medmnist:PATH.npz" | "imagefolder:DIR" | "csv:FILE"
    model: str              # timm name (or "tiny-vit"/"tiny-resnet" test presets)
    method: str | list[str]  # peftvision method name(s), e.g. "lora" or ["bias","norm","attention"]
    method_options: dict = field(default_factory=dict)
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 32    # images per optimiser step (split into accumulation_steps micro-batches)
    image_size: int | None = None  # None: the model's own input size (see default_image_size)
    seed: int = 0
    data_fraction: float = 1.0
    warmup_epochs: int = 1
    patience: int = 5       # early stopping on validation macro-F1 (0: never stop early)
    pretrained: bool = True
    weights: str | None = None
    num_workers: int = 0
    device: str = "auto"    # "auto" | "cpu" | "cuda"
    out: str | None = None  # directory for the result JSON (+ adapter)
    # -- beyond the core interface (all optional) --
    split_seed: int = 0     # seed of the train/val/test split (fixed across run seeds)
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    data_root: str | None = None  # where `medmnist:NAME` downloads go
    dataset_name: str | None = None  # the dataset's name in tables (default from the path)
    label: str | None = None  # the method's name in tables (default: methods joined by "+")
    name: str | None = None  # run directory name under `out` (default from dataset/model/...)
    mixed_precision: str = "auto"  # "auto" (bf16/fp16 on CUDA, none on CPU) | "no" | "fp16" | "bf16"
    quiet: bool = False
    accumulation_steps: int = 1  # gradient accumulation: batch_size // this images per forward
    optimizer: str = "adamw"  # "adamw" | "sgd" (momentum below; SH-PEFT's protocol)
    momentum: float = 0.9
    steps: int | None = None  # iteration-based training: this many optimiser steps, not `epochs`
    head: str = "linear"  # "linear" | "l2norm-linear" (benchmarks/heads.py)
    augment: str = "paper"  # "paper" (resize + flip) | "timm" (benchmarks/timm_augment.py)

    def __post_init__(self) -> None:
        if self.image_size is None:  # resolved once, so run names, results and HPO checks agree
            self.image_size = default_image_size(self.model)
        checks = [(self.epochs >= 1, "epochs must be >= 1"), (self.batch_size >= 1, "batch_size must be >= 1"),
                  (self.image_size >= 8, "image_size must be >= 8"), (self.lr >= 0, "lr must be >= 0"),
                  (self.weight_decay >= 0, "weight_decay must be >= 0"),
                  (0 < self.data_fraction <= 1, "data_fraction must be in (0, 1]"),
                  (self.patience >= 0, "patience must be >= 0 (0: no early stopping)"),
                  (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
                  (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
                  (self.mixed_precision in ("auto", "no", "fp16", "bf16"),
                   "mixed_precision must be auto, no, fp16 or bf16"),
                  (self.accumulation_steps >= 1 and self.batch_size % self.accumulation_steps == 0,
                   "accumulation_steps must be >= 1 and divide batch_size"),
                  (self.optimizer in ("adamw", "sgd"), "optimizer must be adamw or sgd"),
                  (self.steps is None or self.steps >= 1, "steps must be >= 1 (or None: epochs)"),
                  (self.head in HEADS, f"head must be one of {', '.join(HEADS)}"),
                  (self.augment in AUGMENTS, f"augment must be one of {', '.join(AUGMENTS)}")]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError(f"RunConfig: {'; '.join(bad)}")


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA GPU is available")
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    if PartialState._shared_state and PartialState().num_processes == 1:
        # One process, several runs (a sweep, the demo, tests): each run sets its own device and
        # precision. accelerate keeps them process-wide, so start from a clean state. (Under
        # `accelerate launch` with several processes the state is the launcher's and stays.)
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=not cuda, mixed_precision=precision)


def _loader(dataset, cfg: RunConfig, shuffle: bool, seed: int, train: bool = False):
    g = torch.Generator().manual_seed(seed)
    # A last training batch of one sample fails in BatchNorm wherever the map is 1x1 (ResNet at
    # 28 px: "Expected more than 1 value per channel"): drop that one sample (a different one each
    # epoch, as batches are shuffled). Other last batches, and evaluation, keep every sample.
    micro_batch = cfg.batch_size // cfg.accumulation_steps
    drop_last = train and len(dataset) > 1 and len(dataset) % micro_batch == 1
    # training: (index, seed, epoch) keys, so a sample's flip does not depend on the process
    sampler = EpochRandomSampler(len(dataset), g, seed) if train and shuffle else None
    return torch.utils.data.DataLoader(dataset, batch_size=micro_batch, sampler=sampler,
                                       shuffle=shuffle and sampler is None,
                                       drop_last=drop_last, num_workers=cfg.num_workers, generator=g,
                                       persistent_workers=cfg.num_workers > 0,  # keeps their caches
                                       pin_memory=torch.cuda.is_available())


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup to 1 over `warmup_steps`, then cosine to 0 at `total_steps`."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": rest, "weight_decay": 0.0}) if g["params"]]


@torch.no_grad()
def evaluate(model, loader, accelerator, num_classes: int) -> dict:
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        logits = model(x).float()
        p, y = accelerator.gather_for_metrics((logits.softmax(-1), y))
        probs.append(p.cpu())
        labels.append(y.cpu())
    probs = torch.cat(probs).numpy() if probs else np.zeros((0, num_classes))
    return classification_metrics(torch.cat(labels).numpy() if labels else np.zeros(0, np.int64), probs)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what training changes: trainable parameters and all buffers (BN statistics)."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in keep}


def run_experiment(cfg: RunConfig, on_epoch: Callable[[int, float], None] | None = None) -> dict:
    """Train + early-stop on val macro-F1 + test; returns the result dict (also written to cfg.out).
    on_epoch(epoch, val_macro_f1) is called after every epoch; it may raise to stop the run (HPO pruning)."""
    from accelerate.utils import set_seed
    from tqdm import tqdm

    start = time.perf_counter()
    names = method_names(cfg.method)
    label = cfg.label or "+".join(names)
    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    say = (lambda *a: None) if cfg.quiet or not accelerator.is_main_process else (
        lambda *a: print(*a, file=sys.stderr, flush=True))

    data = load_dataset(cfg.dataset, split_seed=cfg.split_seed, val_fraction=cfg.val_fraction,
                        test_fraction=cfg.test_fraction, data_root=cfg.data_root)
    if cfg.dataset_name:
        data.name = cfg.dataset_name
    empty = [s for s, split in data.splits.items() if len(split) == 0]
    if empty:  # else the run trains and writes an n=0 result that would enter the tables
        raise DataError(f"{cfg.dataset}: the {'/'.join(empty)} split has no images; give each split "
                        "images (or a larger val/test fraction)")
    train_split = data.splits["train"]
    train_split = train_split.subset(stratified_subset(train_split.labels, cfg.data_fraction, cfg.seed))
    model = build_model(cfg.model, data.num_classes, cfg.image_size,
                        pretrained=cfg.pretrained and not cfg.weights)
    weights = load_weights(model, cfg.weights) if cfg.weights else None
    set_head(model, cfg.head)
    norm = data_config(model)
    images = TimmImageDataset if cfg.augment == "timm" else ImageDataset
    make = lambda split, train: images(split, cfg.image_size, norm["mean"], norm["std"], train)  # noqa: E731
    train_set = make(train_split, True)
    train_loader = _loader(train_set, cfg, True, cfg.seed, train=True)
    val_loader = _loader(make(data.splits["val"], False), cfg, False, cfg.seed)
    test_loader = _loader(make(data.splits["test"], False), cfg, False, cfg.seed)

    model.to(device)  # before apply: data-driven methods take their gradients on the device
    selection_data = (_loader(make(train_split, False), cfg, False, cfg.seed)
                      if any(needs_data(n) for n in names) else None)
    base_params = sum(p.numel() for p in model.parameters())
    pv.apply(model, method_configs(names, cfg.method_options, selection_data))
    report = pv.report(model)
    say(f"[{label}] {cfg.model} on {data.name}: {report.trainable:,} trainable of {report.total:,} "
        f"({report.percent:.3f}%), train {len(train_split)} / val {len(data.splits['val'])} / "
        f"test {len(data.splits['test'])} images")

    groups = _param_groups(model, cfg.weight_decay)
    optimizer = (torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum) if cfg.optimizer == "sgd"
                 else torch.optim.AdamW(groups, lr=cfg.lr))
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader, test_loader)
    accumulate = cfg.accumulation_steps
    steps_per_epoch = max(1, math.ceil(len(train_loader) / accumulate))  # optimiser steps
    epochs = cfg.epochs if cfg.steps is None else math.ceil(cfg.steps / steps_per_epoch)
    total = cfg.steps or epochs * steps_per_epoch
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total // 2)  # a short run still decays
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, warmup))
    reset_peak_memory(device)

    history, best, best_f1, best_epoch, stale = [], None, -math.inf, 0, 0
    stopped_early = False
    try:
        done = 0  # optimiser steps taken
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            model.train()
            losses = []
            show = accelerator.is_main_process and not cfg.quiet
            bar = tqdm(train_loader, desc=f"{label} epoch {epoch}/{epochs}", leave=False,
                       disable=not (show and progress_enabled()))
            n, full = len(train_loader), len(train_loader) // accumulate * accumulate
            # no bar (a log file, a pipe): a line every 30 s instead of silence
            beat = Heartbeat(active=show and bar.disable)
            n, full = len(train_loader), len(train_loader) // accumulate * accumulate
            if epoch == 1 and beat.active:
                say(f"[{label}] epoch 1/{epochs}: {n} batches (the first epoch also decodes the "
                    "images)")
            for i, (x, y) in enumerate(bar):
                # accumulation: with equal micro-batches the summed gradients are the full batch's
                group = accumulate if i < full else n - full  # the epoch's last, shorter group
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss / group)
                if (i + 1) % accumulate == 0 or i + 1 == n:
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    done += 1
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if beat.due():
                    say(f"[{label}] epoch {epoch}/{epochs}: batch {i + 1}/{n}, "
                        f"loss {losses[-1]:.4f}, {time.perf_counter() - t0:.0f} s")
                if done >= total:  # iteration-based: the last epoch stops mid-way
                    break
            val = evaluate(model, val_loader, accelerator, data.num_classes)
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
                            "val_macro_f1": val["macro_f1"], "val_accuracy": val["accuracy"],
                            "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0})
            say(f"[{label}] epoch {epoch}: loss {history[-1]['train_loss']:.4f}  "
                f"val F1 {val['macro_f1']:.4f}  acc {val['accuracy']:.4f}")
            if val["macro_f1"] > best_f1:
                best_f1, best_epoch, stale = val["macro_f1"], epoch, 0
                best = _snapshot(accelerator.unwrap_model(model))
            else:
                stale += 1
            if on_epoch is not None:
                on_epoch(epoch, val["macro_f1"])
            if cfg.patience > 0 and stale >= cfg.patience:
                stopped_early = epoch < epochs
                break
        train_time = time.perf_counter() - start
        unwrapped = accelerator.unwrap_model(model)
        if best is not None:
            unwrapped.load_state_dict(best, strict=False)
        val = evaluate(model, val_loader, accelerator, data.num_classes)
        test = evaluate(model, test_loader, accelerator, data.num_classes)
        memory = peak_memory(device)
        result = {
            "kind": "peftvision-benchmark-run", "schema": 1, "config_digest": run_digest(cfg),
            "config": {**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, "method": names,
                       "method_options": _json_options(cfg.method_options)},
            "method": {"label": label, "names": names, "options": _json_options(cfg.method_options)},
            "dataset": {"spec": cfg.dataset, "name": data.name, "classes": data.classes,
                        "num_classes": data.num_classes,
                        "split": {**data.describe(), "train_used": len(train_split),
                                  "train_used_per_class": np.bincount(
                                      train_split.labels, minlength=data.num_classes).tolist(),
                                  "train_subset_seed": cfg.seed}},
            "model": {"name": cfg.model, "pretrained": bool(cfg.pretrained or cfg.weights),
                      "weights": weights, "image_size": cfg.image_size, **norm,
                      "base_parameters": base_params},
            "parameters": {**report.to_dict(),
                           "method_params": report.trainable - report.by_method.get("head", 0)},
            "metrics": {"test": test, "val": val, "best_val_macro_f1": best_f1,
                        "best_epoch": best_epoch, "epochs_run": len(history),
                        "stopped_early": stopped_early},
            "history": history,
            "peak_memory": memory,
            "train_time_s": train_time,
        }
        result["adapter"] = _save_adapter(unwrapped, cfg, result, accelerator, data.name, label)
        result["environment"] = environment(str(device), accelerator.num_processes)
        result["wall_time_s"] = time.perf_counter() - start
        if cfg.out and accelerator.is_main_process:
            write_result(result, Path(cfg.out) / result["adapter"]["run"])
        say(f"[{label}] test macro-F1 {test['macro_f1']:.4f}  accuracy {test['accuracy']:.4f}  "
            f"AUROC {test['auroc'] if test['auroc'] is None else round(test['auroc'], 4)}  "
            f"(best epoch {best_epoch}, {result['wall_time_s']:.1f} s)")
        return result
    finally:
        accelerator.free_memory()


def _json_options(options: dict) -> dict:
    return {k: (v if isinstance(v, (str, int, float, bool, list, dict, type(None))) else repr(v))
            for k, v in options.items()}


# Where a run is written and how it is shown, not what it computes: left out of the digest.
NOT_IN_DIGEST = ("out", "name", "quiet", "device", "num_workers", "data_root", "label", "dataset_name")


def run_digest(cfg: RunConfig) -> str:
    """config_digest of what decides a run's numbers: every RunConfig field but NOT_IN_DIGEST,
    methods by canonical name, data and weights by file name (the same run on another machine,
    with its files elsewhere, is the same run)."""
    kind, _, arg = cfg.dataset.partition(":")
    config = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in NOT_IN_DIGEST}
    config.update(dataset=f"{kind}:{Path(arg.rstrip('/')).name}" if arg else kind,
                  method=method_names(cfg.method), method_options=_json_options(cfg.method_options),
                  weights=Path(cfg.weights).name if cfg.weights else None)
    return config_digest(config)


def run_dir_name(cfg: RunConfig) -> str:
    """cfg.name, else dataset__model__method__f<fraction>__s<seed>__<run_digest>."""
    if cfg.name:
        return cfg.name
    label = cfg.label or "+".join(method_names(cfg.method))
    return run_name(cfg.dataset_name or spec_name(cfg.dataset), cfg.model, label, cfg.data_fraction,
                    cfg.seed, run_digest(cfg))


def _save_adapter(model, cfg: RunConfig, result: dict, accelerator, dataset: str, label: str) -> dict:
    """pv.save_adapter into <out>/<run>/ (a temporary directory when cfg.out is None, just to
    measure it); returns the run name, the path and the size of adapter_model.safetensors."""
    run = run_dir_name(cfg)
    if not accelerator.is_main_process:
        return {"run": run, "path": None, "bytes": None}
    metrics = {f"test_{k}": result["metrics"]["test"][k] for k in ("macro_f1", "accuracy")}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(cfg.out) / run if cfg.out else Path(tmp)
        pv.save_adapter(model, directory, tags=["peftvision-benchmark", dataset], metrics=metrics)
        size = (directory / "adapter_model.safetensors").stat().st_size
    return {"run": run, "path": str(directory) if cfg.out else None, "bytes": size}
