"""`python -m benchmarks COMMAND ...`: runs, sweeps, presets, tables, plots. See benchmarks/README.md."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from .generation.run import add_generation_parser
from .hpo import add_hpo_parser
from .presets import DATASETS, PRESETS, demo_runs, expand, missing_data, resolve_datasets
from .reproduce.cli import add_reproduce_parser
from .results import RESULT_NAME, BadResult, print_warning, read_result


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(items: list[str], methods: list[str]) -> dict:
    """["r=8", "alpha=16"] -> {"r": 8, "alpha": 16}; with several methods, "lora.r=8" ->
    {"lora": {"r": 8}}. Values are JSON where they parse (numbers, true, lists), else strings."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option expects KEY=VALUE, got {item!r}")
        if len(methods) > 1:
            method, dot, key = key.partition(".")
            if not dot:
                raise SystemExit(f"with several methods ({'+'.join(methods)}) write --option METHOD.KEY=VALUE")
            out.setdefault(method, {})[key] = _value(value)
        else:
            out[key] = _value(value)
    return out


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def run_many(configs: list, *, resume: bool = False, say=print) -> tuple[list[dict], list[str]]:
    """Run configs in order; skip (with a note) methods a model does not support and, with
    `resume`, runs whose result.json exists. Returns (results, notes)."""
    import peftvision as pv

    from .models import unsupported
    from .train import run_dir_name, run_experiment

    results, notes, checked, runnable = [], [], {}, []
    for cfg in configs:  # first the pairs that cannot run, so [i/n] counts only real runs
        label = cfg.label or "+".join(cfg.method if isinstance(cfg.method, list) else [cfg.method])
        key = (cfg.model, label)
        if key not in checked:
            try:
                checked[key] = unsupported(cfg.model, cfg.method, cfg.image_size)
            except pv.UnknownMethodError as e:
                checked[key] = f"not registered in this peftvision: {e}"
        if checked[key]:
            note = f"skipped {label} on {cfg.model}: {checked[key]}"
            if note not in notes:
                notes.append(note)
                say(note)
        else:
            runnable.append((label, cfg))
    for i, (label, cfg) in enumerate(runnable, 1):
        if resume and cfg.out:
            path = Path(cfg.out) / run_dir_name(cfg) / RESULT_NAME
            if path.is_file():
                try:
                    results.append(read_result(path))
                    say(f"[{i}/{len(runnable)}] exists, skipped: {path.parent}")
                    continue
                except BadResult as e:
                    print_warning(f"{path} {e}: running it again")
        say(f"[{i}/{len(runnable)}] {label} · {cfg.model} · {cfg.dataset} · "
            f"{cfg.data_fraction:.0%} data · seed {cfg.seed}")
        try:
            results.append(run_experiment(cfg))
        except pv.UnsupportedArchitectureError as e:
            notes.append(f"skipped {label} on {cfg.model}: {e}")
            say(notes[-1])
    return results, notes


def _add_training(p: argparse.ArgumentParser, demo: bool = False) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--image-size", type=int,
                   help="default: the model's own input size (timm's pretrained_cfg; 32 for tiny-*)")
    g.add_argument("--patience", type=int, help="early-stopping patience in epochs (0: none)")
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--num-workers", type=int)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--seeds", type=int, nargs="+", help="one run per seed (mean ± std in tables)")
    g.add_argument("--threads", type=int, default=1 if demo else None,
                   help="torch CPU threads" + (" (default 1: tiny models gain nothing from more)" if demo else ""))
    g.add_argument("--quiet", action="store_true", help="no per-epoch lines")


OVERRIDES = ("epochs", "lr", "weight_decay", "batch_size", "image_size", "patience", "warmup_epochs",
             "num_workers", "device", "quiet")


def _overrides(args) -> dict:
    # `is` tests: 0 == False, and --patience 0 / --warmup-epochs 0 are values, not "unset"
    return {k: v for k in OVERRIDES if (v := getattr(args, k, None)) is not None and v is not False}


def cmd_run(args) -> int:
    from accelerate import PartialState

    from .models import method_names
    from .train import RunConfig

    configs = []
    for dataset, model, method, fraction, seed in itertools.product(
            args.dataset, args.model, args.method, args.data_fraction, args.seeds or [0]):
        names = method_names(method)
        configs.append(RunConfig(dataset=dataset, model=model, method=names if len(names) > 1 else names[0],
                                 method_options=parse_options(args.option, names), seed=seed,
                                 data_fraction=fraction, pretrained=args.pretrained, weights=args.weights,
                                 out=args.out, split_seed=args.split_seed, **_overrides(args)))
    results, notes = run_many(configs, resume=args.resume)
    if PartialState._shared_state and not PartialState().is_main_process:
        return 0  # under `accelerate launch`: the main process reports (and saved) the results
    for r in results:
        t = r["metrics"]["test"]
        print(f"{r['method']['label']:<24} {r['dataset']['name']:<12} seed {r['config']['seed']}: "
              f"F1 {t['macro_f1']:.4f}  acc {t['accuracy']:.4f}  AUROC {t['auroc']}  "
              f"-> {r.get('adapter', {}).get('path') or '(not saved: no --out)'}")
    return 0 if results or not configs else 1


def cmd_table(args) -> int:
    from .reproduce.figure2 import write_figure2
    from .reproduce.table4 import load_generation, write_table4
    from .table import write_tables

    generation = ([*write_table4(args.dir, args.out), *write_figure2(args.dir, args.out)]  # Table 4, Figure 2
                  if load_generation(args.dir) else [])
    try:
        files = write_tables(args.dir, args.metric, args.out)
    except FileNotFoundError:
        if generation:  # text-to-image results only
            print("\n".join(f"wrote {p}" for p in generation))
            return 0
        raise
    print(files["markdown"].read_text())
    print("\n".join(f"wrote {p}" for p in [*generation, *files.values()]))
    return 0


def cmd_plot(args) -> int:
    from .plot import write_plots

    print("\n".join(f"wrote {p}" for p in write_plots(args.dir, args.out)))
    return 0


def cmd_preset(args) -> int:
    preset = PRESETS[args.command]
    extra = dict(item.split("=", 1) for item in args.dataset)
    datasets = resolve_datasets(preset, args.data_root, extra, args.only)
    configs = expand(preset, datasets, seeds=args.seeds, out=args.out, weights_dir=args.weights_dir,
                     pretrained=args.pretrained, overrides=_overrides(args))
    missing = missing_data(datasets)
    print(f"{preset.name}: {preset.about}\n  {len(configs)} runs = {len(datasets)} datasets × "
          f"{len(preset.models)} models × {len(preset.methods)} methods × {len(preset.fractions)} "
          f"fractions × {len(args.seeds or preset.seeds)} seeds" + (f"\n  note: {preset.note}" if preset.note else ""))
    for name, spec in datasets.items():
        print(f"  dataset {name}: {spec}{'   (MISSING)' if name in missing else ''}")
    if args.dry_run:
        for c in configs:
            print(f"  {c.label:<22} {c.model:<36} {c.dataset_name:<14} {c.data_fraction:>5.0%}  seed {c.seed}"
                  f"  weights={c.weights or ('hub' if c.pretrained else 'none')}")
        return 0
    if missing:
        lines = [f"  {n}: {s}  ({DATASETS[n].layout if n in DATASETS else 'given with --dataset'})"
                 for n, s in missing.items()]
        print("missing datasets (nothing was run):\n" + "\n".join(lines), file=sys.stderr)
        return 2
    _, notes = run_many(configs, resume=args.resume)
    return _finish(args.out, notes)


def _finish(out: str, notes: list[str]) -> int:
    from .plot import write_plots
    from .table import write_tables

    files = write_tables(out)
    plots = write_plots(out)
    print(files["markdown"].read_text())
    for n in notes:
        print(f"note: {n}")
    print("\n".join(f"wrote {p}" for p in [*files.values(), *plots]))
    return 0


def cmd_demo(args) -> int:
    from .models import method_names
    from .results import load_results
    from .results import rows as result_rows
    from .table import leaderboard

    start = time.perf_counter()
    methods = [method_names(m) for m in args.methods] if args.methods else None
    methods = [m[0] if len(m) == 1 else m for m in methods] if methods else None
    overrides = _overrides(args)
    configs = demo_runs(args.out, methods=methods, seeds=tuple(args.seeds or (0,)),
                        volume=not args.no_volume, overrides=overrides)
    if not args.keep and Path(args.out).is_dir():
        for old in Path(args.out).glob(f"*/{RESULT_NAME}"):
            old.unlink()  # a fresh table: results of earlier demos would mix in
    print(f"peftvision benchmark demo: {len(configs)} runs on a generated 4-class texture dataset "
          f"(32 px), tiny timm models trained from scratch (pretrained=False), offline. "
          f"Results -> {args.out}/", flush=True)
    _, notes = run_many([replace(c, quiet=True) if not args.verbose else c for c in configs],
                        say=lambda m: print(m, flush=True))
    from .plot import write_plots
    from .table import write_tables

    files = write_tables(args.out)
    plots = write_plots(args.out)
    quiet = lambda m: None  # noqa: E731  (table and plot have warned)
    rows = result_rows(load_results(args.out, warn=quiet), warn=quiet)
    print("\n== demo results: test split, NOT pretrained (PEFT adapts a random backbone here, so the "
          "ranking says little about pretrained models) ==\n")
    print(leaderboard([r for r in rows if r["fraction"] == 1.0]))
    for n in notes:
        print(f"note: {n}")
    print(f"\nfinished {len(rows)} runs in {time.perf_counter() - start:.0f} s. Files:")
    print(f"  runs (result.json + adapter each): "
          f"{args.out}/<dataset>__<model>__<method>__f<fraction>__s<seed>__<config digest>/")
    for p in [*files.values(), *plots]:
        print(f"  {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="one run, or a sweep over the product of the lists given")
    p.add_argument("--dataset", nargs="+", required=True, help="demo | medmnist:F.npz | imagefolder:DIR | csv:F")
    p.add_argument("--model", nargs="+", required=True, help="timm name(s), or tiny-resnet / tiny-vit")
    p.add_argument("--method", nargs="+", required=True, help="method(s); a+b combines methods in one run")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option (METHOD.KEY=VALUE for combinations), repeatable")
    p.add_argument("--data-fraction", type=float, nargs="+", default=[1.0])
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--weights", help="local weights file (.safetensors/.pth) instead of the Hub")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", help="directory for result.json + adapter per run (default: not saved)")
    p.add_argument("--resume", action="store_true", help="skip runs whose result.json exists")
    _add_training(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("table", help="Markdown + CSV tables from a results directory")
    p.add_argument("dir")
    p.add_argument("--metric", choices=["f1", "accuracy", "auroc"], default="f1")
    p.add_argument("--out", help="where to write (default: DIR)")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("plot", help="Figure 1 / Figure 3 style plots (PNG + SVG)")
    p.add_argument("dir")
    p.add_argument("--out", help="where to write (default: DIR)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("demo", help="every classification method on generated data, offline (< 5 min)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--methods", nargs="+", help="only these (a+b for combinations); default: all")
    p.add_argument("--no-volume", action="store_true", help="skip the small data-volume sweep")
    p.add_argument("--keep", action="store_true", help="keep earlier results in --out")
    p.add_argument("--verbose", action="store_true", help="per-epoch lines")
    _add_training(p, demo=True)
    p.set_defaults(func=cmd_demo)

    for name, preset in PRESETS.items():
        p = sub.add_parser(name, help=preset.about)
        p.add_argument("--data-root", help="directory holding the datasets (see presets.DATASETS)")
        p.add_argument("--dataset", action="append", default=[], metavar="NAME=SPEC",
                       help="add or replace a dataset, e.g. busi=imagefolder:/data/busi")
        p.add_argument("--only", nargs="+", metavar="NAME", help="run only these datasets")
        p.add_argument("--weights-dir", help="local weights: MODEL.safetensors or MODEL/model.safetensors")
        p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
        p.add_argument("--out", default=f"runs/{name}")
        p.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
        p.add_argument("--resume", action="store_true", help="skip runs whose result.json exists")
        _add_training(p)
        p.set_defaults(func=cmd_preset)

    add_hpo_parser(sub)  # `hpo`: Optuna learning-rate search over run_experiment
    add_generation_parser(sub)  # `generate`: text-to-image UNet fine-tuning with FID
    add_reproduce_parser(sub)  # `reproduce NAME`: a paper's table or figure with its settings
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _threads(getattr(args, "threads", None))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # DataError, ModelError, ConfigError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
