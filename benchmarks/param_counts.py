"""Trainable-parameter counts of every registered method on timm models, from `pv.report`.

    python -m benchmarks.param_counts
    python -m benchmarks.param_counts --models resnet50,vit_base_patch16_224,vit_huge_patch14_224
    python -m benchmarks.param_counts --format json --out param_counts.json

Each (model, method) pair gets a fresh model (timm, pretrained=False, --num-classes classes),
`peftvision.apply(model, method)` with the method's defaults, and `peftvision.report(model)`.
Models are built on the meta device (shapes only, no memory: ViT-H costs nothing); where applying
a method on meta tensors fails, that pair is counted again on a real CPU model and the note says
so. Methods that do not support an architecture (UnsupportedArchitectureError) are skipped.
Methods that choose their weights from data (a `data` option: SPT, SH-PEFT) get one batch of
random images (--data-batch of them) on a real CPU model; SH-PEFT's count is its budget whatever
the data, SPT's LoRA/sparse split depends on data and weights, so its count is only indicative.

Markdown prints two tables, methods x models:
  trainable  pv.report(model).trainable: the method's parameters plus the classifier head,
             as a percentage of the adapted model's parameters (what pv.report prints);
  method     the method's own parameters (the head left out), as a percentage of the base
             model's parameters: the figure PEFT papers compare.
JSON holds the exact counts, the per-method and per-module-type split, and the notes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import timm
import torch

import peftvision as pv

DEFAULT_MODELS = "resnet50,vit_base_patch16_224"


def build(model_name: str, num_classes: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights every run: data-chosen methods depend on them
    with torch.device(device):  # on "meta", parameters have shapes but no storage
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes)


def needs_data(method: str) -> bool:
    return "data" in {f.name for f in dataclasses.fields(pv.get_method(method))}


def random_batch(model: torch.nn.Module, num_classes: int, size: int) -> list:
    """[(images, labels)]: one batch at the model's input size, for data-chosen methods."""
    g = torch.Generator().manual_seed(0)
    shape = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, num_classes, (size,), generator=g))]


def count(model_name: str, method: str, num_classes: int, device: str, data_batch: int,
          options: dict | None = None) -> dict:
    """Apply `method` (with `options`) to a fresh model on `device`; the report's numbers."""
    if needs_data(method):
        device = "cpu"  # gradients of real weights decide what is chosen
    model = build(model_name, num_classes, device)
    base = sum(p.numel() for p in model.parameters())
    data = {"data": random_batch(model, num_classes, data_batch)} if needs_data(method) else {}
    pv.apply(model, method, **data, **(options or {}))
    report = pv.report(model)
    head = report.by_method.get("head", 0)
    return {
        "trainable": report.trainable,
        "total": report.total,
        "percent": report.percent,
        "method_params": report.trainable - head,
        "head_params": head,
        "base_params": base,
        "method_percent_of_base": 100.0 * (report.trainable - head) / base,
        "by_method": report.by_method,
        "by_module_type": report.by_module_type,
        "device": device,
        **({"note": f"weights chosen from one batch of {data_batch} random images"} if data else {}),
    }


def measure(model_name: str, method: str, num_classes: int, device: str, data_batch: int,
            options: dict | None = None) -> dict:
    """One cell: counts, or {"skipped": why}; falls back from meta to CPU on failure."""
    try:
        return count(model_name, method, num_classes, device, data_batch, options)
    except pv.UnsupportedArchitectureError as exc:
        return {"skipped": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any failure on meta tensors is worth a CPU retry
        failure = f"{type(exc).__name__}: {exc}"
        if device == "cpu" or needs_data(method):  # those already ran on CPU
            return {"error": failure}
        cell = measure(model_name, method, num_classes, "cpu", data_batch, options)
        outcome = "failed on CPU too" if "error" in cell else "counted on CPU"
        cell["note"] = f"apply on the meta device failed ({failure}); {outcome}"
        return cell


def human(n: int, percent: float) -> str:
    """e.g. 0.29M (0.34%), 26.6k (0.104%), 0 (0%)."""
    if n == 0:
        return "0 (0%)"
    size = f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}k" if n >= 1000 else str(n)
    return f"{size} ({percent:.2f}%)" if percent >= 0.1 else f"{size} ({percent:.3f}%)"


def markdown(results: dict, models: list[str], methods: list[str], num_classes: int) -> str:
    def table(title: str, value, percent) -> list[str]:
        lines = [title, "", "| method | " + " | ".join(models) + " |",
                 "| --- |" + " ---: |" * len(models)]
        for method in methods:
            cells = []
            for model_name in models:
                cell = results[model_name]["methods"][method]
                ok = "trainable" in cell
                cells.append(human(cell[value], cell[percent]) if ok else "n/a")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return lines

    out = table(f"Trainable parameters, `pv.report(model).trainable` (method + {num_classes}-class "
                "head; % of the adapted model):", "trainable", "percent")
    out += [""] + table("Parameters the method adds or selects (head left out; % of the base "
                        "model):", "method_params", "method_percent_of_base")
    base = [f"{m} {results[m]['base_params']:,}" for m in models]
    out += ["", "Base models (parameters): " + ", ".join(base) + "."]
    notes = []
    for model_name in models:
        for method, cell in results[model_name]["methods"].items():
            said = [cell[k] for k in ("skipped", "note", "error") if k in cell]
            if said:
                notes.append(f"- {model_name} / {method}: {'; '.join(said)}")
    if notes:
        out += ["", "Notes (n/a: the method does not support the architecture, or failed):", *notes]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated timm model names")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method names (default: every registered method)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--device", choices=["meta", "cpu"], default="meta",
                        help="where models are built (meta: no parameter memory)")
    parser.add_argument("--data-batch", type=int, default=2,
                        help="random images in the one batch given to data-chosen methods")
    parser.add_argument("--format", choices=["markdown", "json"], default="markdown")
    parser.add_argument("--out", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else list(pv.methods()))
    unknown = [m for m in models if not timm.is_model(m)]
    if unknown:
        parser.error(f"unknown timm model(s): {', '.join(unknown)}")
    for method in methods:
        try:
            pv.get_method(method)
        except pv.UnknownMethodError as exc:
            parser.error(str(exc))

    results: dict[str, dict] = {}
    for model_name in models:
        print(f"counting {model_name} ...", file=sys.stderr)
        base = build(model_name, args.num_classes, "meta")
        results[model_name] = {
            "base_params": sum(p.numel() for p in base.parameters()),
            "methods": {m: measure(model_name, m, args.num_classes, args.device, args.data_batch)
                        for m in methods},
        }

    if args.format == "json":
        versions = {"peftvision": pv.__version__, "timm": timm.__version__,
                    "torch": torch.__version__}
        text = json.dumps({"num_classes": args.num_classes, "versions": versions,
                           "results": results}, indent=2) + "\n"
    else:
        text = markdown(results, models, methods, args.num_classes)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    failed = [f"{m}/{k}" for m, r in results.items() for k, c in r["methods"].items() if "error" in c]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
