"""Learning-rate search per method x model x dataset: Optuna with successive-halving pruning.

    python -m benchmarks hpo --dataset imagefolder:data/busi --model vit_base_patch16_224 \
        --method lora --option r=8 --trials 40
    python -m benchmarks hpo ... --storage postgresql://USER@HOST/DB --no-retrain   # a worker

Each trial is one `benchmarks.train.run_experiment` run with a sampled learning rate (log-uniform,
optionally the weight decay too); its value is the best validation macro-F1. After every epoch the
run reports that value, and Optuna's SuccessiveHalvingPruner (its ASHA, asynchronous successive
halving, as in the paper: at rungs of min_resource * reduction_factor**k epochs a trial goes on
only if it is in the top 1/reduction_factor of the trials that reached that rung) stops the
trials that fall behind. Then the best trial's parameters are trained again with each
of --seeds, and the test macro-F1 is reported as mean +- std over those seeds: test numbers come
only from these retrain runs, never from the search.

The study lives in an Optuna storage: SQLite by default (one file, one machine). With a
PostgreSQL URL, the same command on many machines joins one study (same name, same storage,
load_if_exists) and each process adds its trials: Optuna's own distributed mode. See docs/hpo.md.

Writes OUT/hpo_summary.json (best parameters, every trial, per-seed retrain metrics) and, through
run_experiment, one result folder per retrain seed: OUT/seed0, OUT/seed1, ... (OUT/seed0-2, ...
when another worker or an earlier retrain has taken it)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import socket
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftvision.progress import enabled as progress_enabled

if TYPE_CHECKING:  # optuna and benchmarks.train are imported only when a search runs
    import optuna

    from benchmarks.train import RunConfig

Objective = Callable[..., dict]  # run_experiment(cfg, on_epoch=None) -> {"metrics": {...}, ...}

DEFAULT_STORAGE = "sqlite:///runs/hpo.db"
# RunConfig fields that may differ between the workers of one study (paths, hardware, names,
# logging) without changing what is searched. Every other field must match the study's first run.
MACHINE_FIELDS = ("out", "device", "num_workers", "weights", "data_root", "name", "label",
                  "dataset_name", "quiet")
SUMMARY_FILE = "hpo_summary.json"


def default_study_name(cfg: RunConfig) -> str:
    """dataset.model.method[options], e.g. 'busi.vit_base_patch16_224.lora[r=8]'."""
    methods = [cfg.method] if isinstance(cfg.method, str) else list(cfg.method)
    name = f"{cfg.dataset}.{cfg.model}.{'+'.join(methods)}"
    if cfg.method_options:
        opts = (f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
                for k, v in sorted(cfg.method_options.items()))
        name += f"[{','.join(opts)}]"
    return name


def macro_f1(metrics: dict, split: str) -> float:
    """result["metrics"]["val_macro_f1"], or ["val"]["macro_f1"] as run_experiment nests it."""
    if f"{split}_macro_f1" in metrics:
        return float(metrics[f"{split}_macro_f1"])
    return float(metrics[split]["macro_f1"])


def _flat_numbers(metrics: dict) -> dict:
    """{"val": {"macro_f1": .8}, "best_epoch": 3} -> {"val_macro_f1": .8, "best_epoch": 3}."""
    flat = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            flat.update({f"{k}_{k2}": v2 for k2, v2 in _flat_numbers(v).items()})
        elif isinstance(v, int | float):
            flat[k] = v
    return flat


def storage_url(url: str) -> str:
    """A bare postgresql:// means psycopg2 to SQLAlchemy 2.0 but psycopg (3) to 2.1: name the
    driver the bench extra installs. URLs that name a driver (postgresql+psycopg2://) are kept."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql+psycopg://{rest}" if sep and scheme in ("postgresql", "postgres") else url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    import optuna

    url = storage_url(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}  # survive a database restart
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Several local processes on one file wait for the write lock instead of failing.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    # Heartbeats: a worker that dies mid-trial leaves a RUNNING trial; the other workers mark it
    # FAILED after grace_period seconds instead of counting it as in progress forever.
    with warnings.catch_warnings():  # "heartbeat_interval is an experimental feature"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                          heartbeat_interval=60, grace_period=180)


def _connect(storage: str, study_name: str) -> tuple[optuna.storages.RDBStorage, optuna.Study]:
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(5):
        try:
            rdb = open_storage(storage)
            study = optuna.create_study(storage=rdb, study_name=study_name, direction="maximize",
                                        load_if_exists=True)
            return rdb, study
        except SQLAlchemyError:
            # Workers started at the same moment on an empty database race to create the tables;
            # the loser's CREATE may fail, and succeeds on the next try.
            if attempt == 4:
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def _check_same_search(study: optuna.Study, fixed: dict) -> None:
    """A study is one search: refuse to add trials run under other fixed settings."""
    stored = study.user_attrs.get("fixed")
    if stored is None:
        study.set_user_attr("fixed", fixed)
    elif stored != fixed:
        diff = {k: (stored.get(k), fixed.get(k)) for k in sorted(stored.keys() | fixed.keys())
                if stored.get(k) != fixed.get(k)}
        raise ValueError(f"study {study.study_name!r} was created with other fixed settings "
                         f"(stored, this run): {diff}; pass another study name for a new search")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: keep only the scheme
        return url.split("://", 1)[0] + "://..."


def _json(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))  # tuples -> lists, as stored in the database


def run_hpo(
    base: RunConfig,
    *,
    trials: int,
    storage: str = DEFAULT_STORAGE,
    study_name: str | None = None,
    lr_range: tuple[float, float] = (1e-5, 1e-1),
    search_weight_decay: bool = False,
    weight_decay_range: tuple[float, float] = (1e-4, 0.3),
    seeds: Sequence[int] = (0, 1, 2),
    objective_fn: Objective | None = None,
    sampler_seed: int | None = 0,
    retrain: bool = True,
    total_trials: int | None = None,
    min_resource: int = 1,
    reduction_factor: int = 3,
) -> dict:
    """Search lr (and weight decay) for `base`, retrain the best with each seed; the summary.

    trials: trials this process runs (a worker's share). total_trials: stop once the study has
    that many finished (complete or pruned) trials, counting every worker's. base.out: where the
    summary and the retrain runs go (None: nothing written). objective_fn defaults to
    benchmarks.train.run_experiment. sampler_seed None draws a fresh one (what workers want).
    """
    import optuna

    if objective_fn is None:
        from benchmarks.train import run_experiment as objective_fn
    name = study_name or default_study_name(base)
    search = {"lr": list(lr_range),
              "weight_decay": list(weight_decay_range) if search_weight_decay else None}
    searched = {"lr", "weight_decay"} if search_weight_decay else {"lr"}
    skip = set(MACHINE_FIELDS) | searched
    fixed = {k: v for k, v in dataclasses.asdict(base).items() if k not in skip}
    fixed = _json({**fixed, "search_space": search})

    rdb, study = _connect(storage, name)
    _check_same_search(study, fixed)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    n_before = len(study.get_trials(deepcopy=False))
    # Offset by the trials already there, so a resumed study draws new points instead of
    # replaying its first ones (same seed, same random start-up trials). The seed is spread out
    # (x 1,000,003) because two workers whose seeds differ by a small number would otherwise
    # draw the same points, one trial apart.
    seed = None if sampler_seed is None else (sampler_seed * 1_000_003 + n_before) % 2**32
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource,
                                                    reduction_factor=reduction_factor)
    study = optuna.load_study(study_name=name, storage=rdb, pruner=pruner,
                              sampler=optuna.samplers.TPESampler(seed=seed))

    def objective(trial: optuna.Trial) -> float:
        params = {"lr": trial.suggest_float("lr", *lr_range, log=True)}
        if search_weight_decay:
            params["weight_decay"] = trial.suggest_float("weight_decay", *weight_decay_range,
                                                         log=True)
        trial.set_user_attr("host", socket.gethostname())
        best, epochs = -math.inf, 0

        def on_epoch(epoch: int, val_macro_f1: float) -> None:
            nonlocal best, epochs
            # Count epochs ourselves (1, 2, ...) whatever base run_experiment counts from, and
            # report the best so far: the value the trial returns, so rungs compare like with like.
            epochs += 1
            best = max(best, float(val_macro_f1))
            trial.report(best, step=epochs)
            # The last epoch is never pruned: the run is done, and its value is worth keeping.
            if epochs < base.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epochs}: best val macro-F1 {best:.4f}")

        result = objective_fn(dataclasses.replace(base, out=None, **params), on_epoch=on_epoch)
        metrics = result["metrics"]
        trial.set_user_attr("metrics", {k: v for k, v in _flat_numbers(metrics).items()
                                        if not k.startswith("test")})  # no test peeking
        return macro_f1(metrics, "val")

    n = trials
    callbacks = []
    if total_trials is not None:
        n = max(0, min(n, total_trials - len(study.get_trials(deepcopy=False, states=finished))))
        callbacks.append(optuna.study.MaxTrialsCallback(total_trials, states=finished))
    if n:
        study.optimize(objective, n_trials=n, callbacks=callbacks, gc_after_trial=True,
                       show_progress_bar=progress_enabled())  # a bar over trials on a terminal

    summary = summarize(study, storage=storage, base=base, search=search, seed=seed,
                        pruner={"min_resource": min_resource, "reduction_factor": reduction_factor})
    if retrain:
        summary["retrain"] = retrain_best(study, base, seeds, objective_fn)
    if base.out:
        path = Path(base.out) / SUMMARY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SUMMARY_FILE}.{socket.gethostname()}.{os.getpid()}")  # one per worker
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        os.replace(tmp, path)  # atomic: a worker finishing at the same time never leaves half a file
        summary["path"] = str(path)
    return summary


def retrain_best(study: optuna.Study, base: RunConfig, seeds: Sequence[int],
                 objective_fn: Objective) -> dict:
    """Train the best trial's parameters once per seed (no pruning); test macro-F1 mean +- std."""
    import optuna

    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise ValueError(f"study {study.study_name!r} has no completed trial to retrain")
    params = study.best_trial.params
    runs = []
    for seed in seeds:
        out = str(claim_dir(Path(base.out) / f"seed{seed}")) if base.out else None
        result = objective_fn(dataclasses.replace(base, seed=seed, out=out, **params))
        m = result["metrics"]
        runs.append({"seed": seed, "val_macro_f1": macro_f1(m, "val"),
                     "test_macro_f1": macro_f1(m, "test"), "metrics": m, "out": out})
    test = [r["test_macro_f1"] for r in runs]
    mean = statistics.fmean(test)
    std = statistics.stdev(test) if len(test) > 1 else 0.0  # sample std (n - 1) over seeds
    return {"params": params, "seeds": list(seeds), "runs": runs, "test_macro_f1_mean": mean,
            "test_macro_f1_std": std, "test_macro_f1": f"{mean:.4f} ± {std:.4f}"}


def claim_dir(path: Path) -> Path:
    """Create and return `path`, or `path`-2, -3, ... when taken: workers retraining into one --out
    (or a study retrained again) never share a folder, so no run overwrites another. mkdir is
    atomic, also between machines on a shared file system."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for i in itertools.count(1):
        candidate = path if i == 1 else path.with_name(f"{path.name}-{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def summarize(study: optuna.Study, *, storage: str, base: RunConfig, search: dict,
              seed: int | None, pruner: dict) -> dict:
    """The study as plain JSON: counts by state, the best trial, one row per trial."""
    import optuna

    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "params": t.params, "epochs": t.last_step, "duration_s": duration,
                     "host": t.user_attrs.get("host")})
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    best = None
    if counts.get("COMPLETE"):
        b = study.best_trial
        best = {"number": b.number, "val_macro_f1": b.value, "params": b.params}
    return {
        "kind": "peftvision-hpo-summary",
        "study": study.study_name,
        "storage": _redact(storage),
        "objective": "maximize best validation macro-F1",
        "search_space": search,
        "pruner": {"name": "SuccessiveHalvingPruner", **pruner},
        "sampler": {"name": "TPESampler", "seed": seed},
        "base_config": _json(dataclasses.asdict(base)),
        "n_trials": counts,
        "best": best,
        "trials": rows,
        "retrain": None,
        "optuna": optuna.__version__,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------------------------------
# Command line: `python -m benchmarks hpo ...` (benchmarks/cli.py calls add_hpo_parser).

# RunConfig fields set from the command line only when given: RunConfig keeps its own defaults.
_RUN_ARGS = ("epochs", "weight_decay", "batch_size", "image_size", "seed", "data_fraction",
             "split_seed", "warmup_epochs", "patience", "weights", "num_workers", "device")


def add_hpo_parser(subparsers) -> argparse.ArgumentParser:
    """The `hpo` subcommand; its func returns an exit code, like benchmarks/cli.py's commands."""
    p = subparsers.add_parser(
        "hpo", help="learning-rate search (Optuna, successive-halving pruning), then retrain",
        description="Search the learning rate (and optionally weight decay) of METHOD on MODEL "
        "and DATASET by best validation macro-F1, pruning weak trials by successive halving; "
        "then retrain the best with each --seeds and report test macro-F1 mean +- std. "
        "Several processes or machines given the same --storage and --study share one search. "
        "See docs/hpo.md.")
    run = p.add_argument_group("the runs (benchmarks.train.RunConfig; unset: its defaults)")
    run.add_argument("--dataset", required=True, help="demo | medmnist:F.npz | imagefolder:DIR | csv:F")
    run.add_argument("--model", required=True, help="timm name, or tiny-resnet / tiny-vit")
    run.add_argument("--method", required=True, help="method; a+b combines methods in one run")
    run.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="method option (METHOD.KEY=VALUE for combinations), repeatable")
    run.add_argument("--epochs", type=int)
    run.add_argument("--weight-decay", type=float, help="fixed weight decay (unless searched)")
    run.add_argument("--batch-size", type=int)
    run.add_argument("--image-size", type=int,
                     help="default: the model's own input size (timm's pretrained_cfg; 32 for tiny-*)")
    run.add_argument("--seed", type=int, help="training seed of the search trials")
    run.add_argument("--data-fraction", type=float)
    run.add_argument("--split-seed", type=int)
    run.add_argument("--warmup-epochs", type=int)
    run.add_argument("--patience", type=int, help="early-stopping patience in epochs (0: none)")
    run.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    run.add_argument("--weights", help="local weights file (.safetensors/.pth) instead of the Hub")
    run.add_argument("--num-workers", type=int)
    run.add_argument("--device", choices=["auto", "cpu", "cuda"])
    run.add_argument("--threads", type=int, help="torch CPU threads")
    run.add_argument("--quiet", action="store_true", help="no per-epoch lines")

    s = p.add_argument_group("the search")
    s.add_argument("--trials", type=int, default=20, help="trials this process runs (default 20)")
    s.add_argument("--total-trials", type=int,
                   help="stop when the study has this many finished trials, all workers counted")
    s.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"Optuna storage URL (default {DEFAULT_STORAGE}); postgresql://... to "
                   "share the study between machines")
    s.add_argument("--study", help="study name (default DATASET.MODEL.METHOD[OPTIONS])")
    s.add_argument("--lr-range", type=float, nargs=2, default=(1e-5, 1e-1), metavar=("MIN", "MAX"))
    s.add_argument("--search-weight-decay", action="store_true")
    s.add_argument("--weight-decay-range", type=float, nargs=2, default=(1e-4, 0.3),
                   metavar=("MIN", "MAX"))
    s.add_argument("--sampler-seed", type=int,
                   help="TPE seed (default 0; with --no-retrain a fresh one, so that workers do "
                   "not all try the same learning rates)")
    s.add_argument("--reduction-factor", type=int, default=3,
                   help="successive halving keeps the top 1/N at each rung (default 3)")
    s.add_argument("--min-resource", type=int, default=1,
                   help="epochs before the first rung (default 1); rungs at MIN*N**k")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="retrain the best trial with each of these seeds (default 0 1 2)")
    s.add_argument("--retrain", action=argparse.BooleanOptionalAction, default=True,
                   help="retrain the best trial after the search (--no-retrain: a worker only)")
    s.add_argument("--out", help="summary and retrain runs (default runs/hpo/STUDY)")
    p.set_defaults(func=cmd_hpo)
    return p


def config_from_args(args: argparse.Namespace, config_cls: type | None = None) -> RunConfig:
    from benchmarks.cli import parse_options
    from benchmarks.models import method_names

    if config_cls is None:
        from benchmarks.train import RunConfig as config_cls
    names = method_names(args.method)  # aliases resolved: one study per method, whatever spelling
    given = {k: getattr(args, k) for k in _RUN_ARGS if getattr(args, k) is not None}
    return config_cls(dataset=args.dataset, model=args.model,
                      method=names[0] if len(names) == 1 else names,
                      method_options=parse_options(args.option, names),
                      pretrained=args.pretrained, quiet=args.quiet, **given)


def run_from_args(args: argparse.Namespace, objective_fn: Objective | None = None,
                  config_cls: type | None = None) -> dict:
    cfg = config_from_args(args, config_cls)
    name = args.study or default_study_name(cfg)
    out = args.out or str(Path("runs") / "hpo" / re.sub(r"[^\w.=+,\[\]-]", "_", name))
    sampler_seed = args.sampler_seed
    if sampler_seed is None and args.retrain:
        sampler_seed = 0
    summary = run_hpo(
        dataclasses.replace(cfg, out=out), trials=args.trials, total_trials=args.total_trials,
        storage=args.storage, study_name=name, lr_range=tuple(args.lr_range),
        search_weight_decay=args.search_weight_decay,
        weight_decay_range=tuple(args.weight_decay_range), seeds=args.seeds,
        objective_fn=objective_fn, sampler_seed=sampler_seed, retrain=args.retrain,
        min_resource=args.min_resource, reduction_factor=args.reduction_factor)
    print(format_summary(summary))
    return summary


def cmd_hpo(args: argparse.Namespace) -> int:
    run_from_args(args)
    return 0


def format_summary(summary: dict, top: int = 10) -> str:
    lines = [f"study {summary['study']} on {summary['storage']}: "
             + ", ".join(f"{n} {state.lower()}" for state, n in sorted(summary["n_trials"].items()))]
    done = sorted((r for r in summary["trials"] if r["state"] == "COMPLETE"),
                  key=lambda r: -r["value"])
    if done:
        lines.append(f"{'trial':>5} {'val F1':>7} {'epochs':>6}  params")
        for r in done[:top]:
            params = " ".join(f"{k}={v:.3g}" for k, v in r["params"].items())
            lines.append(f"{r['number']:>5} {r['value']:>7.4f} {r['epochs'] or 0:>6}  {params}")
    if summary["retrain"]:
        rt = summary["retrain"]
        per_seed = ", ".join(f"seed {r['seed']}: {r['test_macro_f1']:.4f}" for r in rt["runs"])
        lines.append(f"retrained {rt['params']}: test macro-F1 {rt['test_macro_f1']} ({per_seed})")
    if "path" in summary:
        lines.append(f"wrote {summary['path']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.hpo ARGS` = `python -m benchmarks hpo ARGS`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hpo")
    add_hpo_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["hpo", *(argv if argv is not None else sys.argv[1:])])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
