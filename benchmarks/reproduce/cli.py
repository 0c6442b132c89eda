"""`python -m benchmarks reproduce NAME [--dry-run --json]`: run a paper's grid, end with its
table or figure. Narrow with --datasets/--models/--methods/--seeds; --resume continues."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from . import GRIDS
from .grid import Grid, Run

# Dataset specs under --data-root (the layouts the user downloads; see docs/benchmarks.md).
EXTRA_DATASETS = {
    "ham10000": ("csv:{root}/ham10000/labels.csv", "HAM10000: labels.csv written by `python -m "
                 "benchmarks.datasets ham10000 DOWNLOAD_DIR --out ROOT/ham10000/labels.csv`"),
    "rsna-pneumonia": ("csv:{root}/rsna-pneumonia/labels.csv",
                       "RSNA Pneumonia: labels.csv + images/ written by `python -m benchmarks.datasets "
                       "rsna-pneumonia DOWNLOAD_DIR --out ROOT/rsna-pneumonia/labels.csv`"),
    "fitzpatrick17k": ("csv:{root}/fitzpatrick17k/labels.csv",
                       "Fitzpatrick17k: labels.csv written by `python -m benchmarks.datasets fitzpatrick17k "
                       "DOWNLOAD_DIR --out ROOT/fitzpatrick17k/labels.csv` (fitzpatrick17k.csv + <md5hash>.jpg)"),
    "smdg": ("csv:{root}/smdg/labels.csv",
             "SMDG-19: labels.csv written by `python -m benchmarks.datasets smdg DOWNLOAD_DIR --out "
             "ROOT/smdg/labels.csv` ('metadata - standardized.csv' + full-fundus/)"),
    "mimic-cxr": ("mimic-cxr:{root}/mimic-cxr", "MIMIC-CXR-JPG with the reports, as PhysioNet publishes "
                  "them: mimic-cxr/{mimic-cxr-2.0.0-split.csv.gz, mimic-cxr-2.0.0-metadata.csv.gz, "
                  "files/pXX/pID/sSTUDY/*.jpg, files/pXX/pID/sSTUDY.txt}"),
}


def dataset_specs(names, data_root: str | None, given: dict[str, str]) -> dict[str, str | None]:
    """name -> loader spec (None where neither --data-root nor --dataset NAME=SPEC says where)."""
    from ..presets import DATASETS

    out = {}
    for n in names:
        if n in given:
            out[n] = given[n]
        elif data_root is None:
            out[n] = None
        elif n in EXTRA_DATASETS:  # the published layouts (benchmarks/datasets/) first
            out[n] = EXTRA_DATASETS[n][0].format(root=str(data_root).rstrip("/"))
        elif n in DATASETS:
            out[n] = DATASETS[n].spec.format(root=str(data_root).rstrip("/"))
        else:
            out[n] = None
    return out


def layout(name: str) -> str:
    from ..presets import DATASETS

    if name in EXTRA_DATASETS:
        return EXTRA_DATASETS[name][1]
    return DATASETS[name].layout if name in DATASETS else "given with --dataset"


def _model_map(items: list[str], models) -> dict[str, str]:
    """--model-as LOCAL (every model) or PAPER=LOCAL, for reduced runs (tiny-vit, tiny-resnet)."""
    out = {}
    for item in items:
        paper, sep, local = item.rpartition("=")
        out.update({m: local for m in models} if not sep else {paper: local})
    return out


def apply_overrides(grid: Grid, args) -> Grid:
    """The command line's changes to every run (reduced runs, other hardware)."""
    changes = {k: getattr(args, k) for k in ("image_size", "batch_size", "micro_batch")
               if getattr(args, k, None) is not None}
    if args.lr is not None:
        changes["lr"] = args.lr
    if args.hpo_trials is not None:
        changes["hpo_trials"] = args.hpo_trials
    models = _model_map(args.model_as, {r.model for r in grid.runs})
    runs = []
    for r in grid.runs:
        c = dict(changes)
        # --epochs shortens epoch-based runs, --steps iteration-based ones (SH-PEFT)
        if args.epochs is not None and r.steps is None:
            c["epochs"] = args.epochs
        if args.steps is not None and r.steps is not None:
            c["steps"] = args.steps
        if "batch_size" in c and "micro_batch" not in c:
            c["micro_batch"] = min(r.micro_batch, c["batch_size"])
        if r.model in models:
            c["model"] = models[r.model]
        if not args.pretrained:
            c["weights"] = "none"
        runs.append(dataclasses.replace(r, **c))
    return dataclasses.replace(grid, runs=tuple(runs))


def dry_run(grid: Grid, specs: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"grid": grid.name, "paper": grid.paper, "about": grid.about,
                          "output": grid.output, "runs": [r.to_json() for r in grid.runs],
                          "count": len(grid.runs), "datasets": specs,
                          "cost_gpu_hours": round(grid.cost_gpu_hours(), 2),
                          "cost_assumption": "3 × forward FLOPs per training image at 100 TFLOP/s; "
                                             "every HPO trial counted as a full run",
                          "choices": [dataclasses.asdict(c) for c in grid.choices],
                          "runnable": grid.runnable or None}, indent=1))
        return 0
    print(f"{grid.name}: {grid.paper} — {grid.about}\n  {len(grid.runs)} runs, about "
          f"{grid.cost_gpu_hours():.1f} GPU-hours (HPO included)")
    for r in grid.runs:
        lr = r.lr if r.lr == "hpo" else f"{r.lr:g}"
        length = f"{r.steps} steps" if r.steps else f"{r.epochs} ep"
        print(f"  {r.dataset:<15} {r.model:<36} {r.label:<22} {r.fraction:>5.0%} seed {r.seed}  "
              f"{r.optimizer} bs {r.batch_size}/{r.micro_batch} lr {lr} {length}")
    for c in grid.choices:
        print(f"  choice · {c.topic}: paper says {c.paper} / we do {c.ours} / why: {c.why}")
    if grid.runnable:
        print(f"  note: {grid.runnable}")
    return 0


def run_config(r: Run, spec: str, args):
    """The RunConfig of one classification run."""
    from ..presets import weights_for
    from ..train import RunConfig

    pretrained = r.weights != "none"
    split = r.split
    return RunConfig(dataset=spec, model=r.model, method=list(r.method) if len(r.method) > 1 else r.method[0],
                     method_options=dict(r.options), epochs=r.epochs or 1, steps=r.steps,
                     optimizer=r.optimizer, head=r.head, lr=r.lr if r.lr != "hpo" else 1e-3,
                     warmup_epochs=1 if r.schedule == "warmup-cosine" else 0,
                     weight_decay=r.weight_decay, batch_size=r.batch_size,
                     accumulation_steps=r.accumulation, image_size=r.image_size, seed=r.seed,
                     data_fraction=r.fraction, val_fraction=split.get("val", 0.1),
                     test_fraction=split.get("test", 0.2), pretrained=pretrained,
                     weights=weights_for(r.model, args.weights_dir) if pretrained else None,
                     out=args.out, label=r.label, dataset_name=r.dataset, quiet=args.quiet,
                     device=args.device, num_workers=args.num_workers, augment=args.augment,
                     patience=args.patience if args.patience is not None else r.patience)


def execute(grid: Grid, specs: dict, args) -> list[str]:
    """Every run: fixed lr through run_many, text-to-image through generate, "hpo" cells through
    one Optuna study each (sweep.py); --search-only runs the searches alone."""
    from ..cli import run_many
    from .sweep import search_cells

    notes = []
    generation = [r for r in grid.runs if r.task == "text-to-image"]
    fixed = [r for r in grid.runs if r.lr != "hpo" and r.task == "classification"]
    if args.search_only:
        if generation or fixed:
            notes.append(f"--search-only: {len(generation) + len(fixed)} run(s) without a search "
                         "left for a run without --search-only")
    else:
        if generation:
            from .text_to_image import execute_generation

            execute_generation(generation, specs, args)
        if fixed:
            _, more = run_many([run_config(r, specs[r.dataset], args) for r in fixed], resume=args.resume)
            notes += more
    search_cells(grid, specs, args, run_config)
    return notes


def finish(grid: Grid, out: str, notes: list[str], args) -> int:
    from ..plot import write_plots
    from ..table import write_tables
    from .outputs import write_outputs

    if args.search_only:
        print("\n".join(f"note: {n}" for n in notes))
        from ..hpo import _redact
        from .sweep import storage_for

        print(f"search done on {_redact(storage_for(args))}; when every worker has "
              f"finished, run the same command without --search-only to retrain and make the table")
        return 0
    if grid.output == "table4":  # text-to-image: Table 4 and the Figure 2 grids only
        written = write_outputs(grid.output, out)
    else:
        files = write_tables(out)
        print(files["markdown"].read_text())
        written = [*files.values(), *write_plots(out), *write_outputs(grid.output, out)]
    for n in notes:
        print(f"note: {n}")
    print("\n".join(f"wrote {p}" for p in written))
    return 0


def cmd_reproduce(args) -> int:
    grid = GRIDS[args.name]()
    grid = grid.narrow(datasets=args.datasets, models=args.models, methods=args.methods, seeds=args.seeds)
    grid = apply_overrides(grid, args)
    if not grid.runs:
        print(f"{args.name}: nothing left after --datasets/--models/--methods/--seeds", file=sys.stderr)
        return 2
    given = dict(item.split("=", 1) for item in args.dataset)
    specs = dataset_specs(sorted({r.dataset for r in grid.runs}), args.data_root, given)
    if args.dry_run:
        return dry_run(grid, specs, args.json)
    if args.status:
        from .sweep import status, storage_for

        print(status(grid, storage_for(args)))
        return 0
    if grid.runnable:
        print(f"{grid.name}: {grid.runnable}", file=sys.stderr)
        return 2
    from ..presets import missing_data

    missing = {n: s for n, s in specs.items() if s is None}
    missing.update(missing_data({n: s for n, s in specs.items() if s is not None}))
    if missing:
        lines = [f"  {n}: {s or '(no --data-root)'}  expected: {layout(n)}" for n, s in missing.items()]
        print("missing datasets (nothing was run; give --data-root DIR or --dataset NAME=SPEC):\n"
              + "\n".join(lines), file=sys.stderr)
        return 2
    notes = execute(grid, specs, args)
    from accelerate import PartialState

    if PartialState._shared_state and not PartialState().is_main_process:
        return 0  # under `accelerate launch`: the main process writes the tables and figures
    return finish(grid, args.out, notes, args)


def add_reproduce_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("reproduce", help="a paper's table or figure: its grid with its settings")
    p.add_argument("name", choices=list(GRIDS))
    p.add_argument("--data-root", help="directory holding the datasets (layouts in docs/benchmarks.md)")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=SPEC",
                   help="where one dataset is, e.g. ham10000=medmnist:/data/ham.npz")
    p.add_argument("--datasets", nargs="+", help="only these datasets of the grid")
    p.add_argument("--models", nargs="+", help="only these models of the grid (paper names)")
    p.add_argument("--methods", nargs="+", help="only these methods (labels) of the grid")
    p.add_argument("--seeds", type=int, nargs="+", help="only these seeds of the grid")
    p.add_argument("--model-as", action="append", default=[], metavar="[PAPER=]LOCAL",
                   help="run another model in place of the paper's (e.g. tiny-vit for a smoke run)")
    p.add_argument("--dry-run", action="store_true", help="print the grid, run nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: the grid as JSON")
    p.add_argument("--resume", action="store_true", help="skip runs and cells whose results exist")
    p.add_argument("--storage", help="Optuna storage of the lr searches (default sqlite:///OUT/hpo.db); "
                   "postgresql://USER@HOST/DB spreads a sweep over machines (docs/hpo.md)")
    p.add_argument("--search-only", action="store_true",
                   help="a sweep worker: run the lr searches up to each cell's trial count, no retrain")
    p.add_argument("--status", action="store_true", help="trials per cell on --storage, then exit")
    p.add_argument("--out", help="results directory (default runs/NAME)")
    p.add_argument("--weights-dir", help="local weights: MODEL.safetensors or MODEL/model.safetensors")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    g = p.add_argument_group("overrides (default: the paper's settings)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--lr", type=float, help="a fixed learning rate instead of the per-cell search")
    g.add_argument("--hpo-trials", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--micro-batch", type=int, help="per-step batch; the rest is gradient accumulation")
    g.add_argument("--image-size", type=int)
    g.add_argument("--patience", type=int)
    g.add_argument("--augment", choices=["paper", "timm"], default="paper",
                   help="paper: resize + flip (default); timm: timm.data.create_transform's recipe")
    g.add_argument("--fid-images", type=int, help="text-to-image: held-out images for FID (paper 1,000)")
    g.add_argument("--inference-steps", type=int, help="text-to-image: sampling steps (default 50)")
    g.add_argument("--fid-features", choices=["auto", "inception", "offline"], default="auto",
                   help="text-to-image: InceptionV3 (auto: if it loads) or the offline features")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_dispatch)
    return p


def _dispatch(args) -> int:
    args.out = args.out or f"runs/{args.name}"
    return cmd_reproduce(args)
