"""The learning-rate search of a grid: one Optuna study per cell (dataset × model × method ×
fraction) on one storage, so a sweep spreads over machines (docs/hpo.md).

    reproduce NAME --storage URL --search-only     a worker: search every cell up to its trial
                                                  count, no retrain (run it on N machines)
    reproduce NAME --storage URL --status          trials per cell, best so far (any machine)
    reproduce NAME --storage URL                   search what is left, retrain each cell's best
                                                  with the grid's seeds, then the table
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .grid import Grid, Run


def cells(grid: Grid) -> dict[str, list[Run]]:
    """study name -> the runs (one per seed) of every "hpo" cell, in grid order."""
    from ..results import slug

    out: dict[str, list[Run]] = {}
    for r in grid.runs:
        if r.lr == "hpo":
            d, m, label, f = r.cell
            out.setdefault(slug(f"{d}__{m}__{label}__f{f:g}"), []).append(r)
    return out


def storage_for(args) -> str:
    return args.storage or f"sqlite:///{Path(args.out).resolve() / 'hpo.db'}"


def search_cells(grid: Grid, specs: dict, args, run_config) -> None:
    """Every cell: trials up to the grid's count (shared by every process on the storage), then,
    unless --search-only, the best lr retrained with each seed into OUT/<cell>/seed<S>/."""
    from ..hpo import run_hpo
    from ..results import RESULT_NAME

    todo = cells(grid)
    storage = storage_for(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for i, (name, runs) in enumerate(todo.items(), 1):
        base = dataclasses.replace(run_config(runs[0], specs[runs[0].dataset], args),
                                   out=str(Path(args.out) / name))
        seeds = [r.seed for r in runs]
        trials = runs[0].hpo_trials or 20
        if (args.resume and not args.search_only
                and all(any((Path(base.out) / f"seed{s}").rglob(RESULT_NAME)) for s in seeds)):
            print(f"[cell {i}/{len(todo)}] exists, skipped: {base.out}")
            continue
        then = "search only" if args.search_only else f"then seeds {seeds}"
        print(f"[cell {i}/{len(todo)}] {name}: lr search to {trials} trials, {then}", flush=True)
        # a worker draws its own sampler seed, so workers started together try different lrs
        run_hpo(base, trials=trials, total_trials=trials, storage=storage, study_name=name, seeds=seeds,
                retrain=not args.search_only, sampler_seed=None if args.search_only else 0)


def status(grid: Grid, storage: str) -> str:
    """One line per cell: finished / wanted trials by state, and the best validation macro-F1."""
    import optuna

    from ..hpo import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = open_storage(storage)
    known = {s.study_name for s in optuna.get_all_study_summaries(rdb, include_best_trial=False)}
    lines = [f"{'cell':<72} {'done':>9} {'run':>4} {'fail':>4}  best val F1 (lr)"]
    finished = total = 0
    for name, runs in cells(grid).items():
        wanted = runs[0].hpo_trials or 20
        total += wanted
        if name not in known:
            lines.append(f"{name:<72} {0:>4}/{wanted:<4} {0:>4} {0:>4}  –")
            continue
        trials = optuna.load_study(study_name=name, storage=rdb).get_trials(deepcopy=False)
        n = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "RUNNING", "FAIL")}
        done = n["COMPLETE"] + n["PRUNED"]
        finished += min(done, wanted)
        complete = [t for t in trials if t.state.name == "COMPLETE"]
        best = max(complete, key=lambda t: t.value, default=None)
        shown = f"{best.value:.4f} ({best.params['lr']:.3g})" if best else "–"
        lines.append(f"{name:<72} {done:>4}/{wanted:<4} {n['RUNNING']:>4} {n['FAIL']:>4}  {shown}")
    lines.append(f"{finished}/{total} trials finished over {len(cells(grid))} cells")
    return "\n".join(lines)
