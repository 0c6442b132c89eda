"""Result tables in the papers' layout, from the run JSONs.

One table per (model, data fraction, pretrained): datasets as rows (with their sizes), methods as
columns (with the method's own parameter count, head excluded), cells mean ± std of the test
metric over seeds (in %), then the average over datasets and the average rank (methods ranked
per dataset by mean, ties sharing the mean of their ranks; 1 = best).

    python -m benchmarks table DIR [--metric f1|accuracy|auroc] [--out DIR]
writes tables.md, tables.csv (one block per table) and summary.csv (one line per cell).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from .metrics import mean_std
from .results import load_results
from .results import rows as result_rows

METRICS = {"f1": "test macro-F1", "accuracy": "test accuracy", "auroc": "test AUROC"}
FIRST = ("full", "linear")  # the papers' reference columns come first


@dataclass
class Cell:
    mean: float | None
    std: float | None
    n: int


@dataclass
class Table:
    model: str
    fraction: float
    pretrained: bool
    metric: str
    datasets: list[str]
    sizes: dict[str, dict]
    methods: list[str]
    params: dict[str, int]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

    @property
    def title(self) -> str:
        weights = "pretrained" if self.pretrained else "NOT pretrained (random init, pretrained=False)"
        return (f"{self.model}, {self.fraction:.0%} of the training data, {weights}: "
                f"{METRICS[self.metric]} (%), mean ± std over seeds")

    def average(self, method: str) -> float | None:
        values = [self.cells[d, method].mean for d in self.datasets if (d, method) in self.cells]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    def ranks(self) -> dict[str, float | None]:
        return average_ranks({d: {m: self.cells[d, m].mean for m in self.methods if (d, m) in self.cells}
                              for d in self.datasets})

    def complete(self, method: str) -> bool:
        return all((d, method) in self.cells and self.cells[d, method].mean is not None
                   for d in self.datasets)


def rank_within(scores: dict[str, float | None]) -> dict[str, float]:
    """1-based ranks of the methods by score, highest first; ties share their mean rank."""
    valid = sorted(((s, m) for m, s in scores.items() if s is not None), key=lambda t: -t[0])
    ranks, i = {}, 0
    while i < len(valid):
        j = i
        while j + 1 < len(valid) and valid[j + 1][0] == valid[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[valid[k][1]] = (i + 1 + j + 1) / 2
        i = j + 1
    return ranks


def average_ranks(per_dataset: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """Mean over datasets of each method's rank there (over the datasets where it has a score)."""
    collected: dict[str, list[float]] = defaultdict(list)
    methods = {m for scores in per_dataset.values() for m in scores}
    for scores in per_dataset.values():
        for m, r in rank_within(scores).items():
            collected[m].append(r)
    return {m: (sum(collected[m]) / len(collected[m]) if collected[m] else None) for m in methods}


def human(n: int | None) -> str:
    if n is None:
        return "?"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}" if n < 10 * div else f"{n / div:.1f}{unit}"
    return str(n)


def build_tables(rows: list[dict], metric: str = "f1") -> list[Table]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["model"], r["fraction"], r["pretrained"]].append(r)
    tables = []
    for (model, fraction, pretrained), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        values: dict[tuple[str, str], list] = defaultdict(list)
        params: dict[str, list[int]] = defaultdict(list)
        sizes: dict[str, dict] = {}
        for r in rs:
            values[r["dataset"], r["method"]].append(r[metric])
            params[r["method"]].append(r["method_params"])
            sizes.setdefault(r["dataset"], r["dataset_size"])
        med = {m: int(median(v)) for m, v in params.items()}
        methods = sorted(med, key=lambda m: (m not in FIRST, FIRST.index(m) if m in FIRST else 0, med[m], m))
        table = Table(model, fraction, pretrained, metric, sorted(sizes), sizes, methods, med)
        for key, vs in values.items():
            mean, std, n = mean_std(vs)
            table.cells[key] = Cell(None if mean is None else 100 * mean,
                                    None if std is None else 100 * std, n)
        tables.append(table)
    return tables


def _fmt(cell: Cell | None) -> str:
    if cell is None or cell.mean is None:
        return "–"
    return f"{cell.mean:.1f}" if cell.std is None else f"{cell.mean:.1f}±{cell.std:.1f}"


def _size(sizes: dict) -> str:
    total = sum(sizes.values())
    return f"{total} ({sizes.get('train', 0)}/{sizes.get('val', 0)}/{sizes.get('test', 0)})"


def markdown(table: Table) -> str:
    head = ["dataset (train/val/test)"] + [f"{m}<br>{human(table.params[m])}" for m in table.methods]
    lines = [f"### {table.title}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for d in table.datasets:
        means = {m: table.cells[d, m].mean for m in table.methods if (d, m) in table.cells}
        top = max((v for v in means.values() if v is not None), default=None)
        cells = []
        for m in table.methods:
            text = _fmt(table.cells.get((d, m)))
            cells.append(f"**{text}**" if top is not None and means.get(m) == top else text)
        lines.append(f"| {d} {_size(table.sizes[d])} | " + " | ".join(cells) + " |")
    ranks = table.ranks()
    star = lambda m: "" if table.complete(m) else "*"  # noqa: E731
    avg = [(f"{table.average(m):.1f}{star(m)}" if table.average(m) is not None else "–") for m in table.methods]
    rk = [(f"{ranks[m]:.2f}{star(m)}" if ranks.get(m) is not None else "–") for m in table.methods]
    lines += ["| average | " + " | ".join(avg) + " |", "| average rank | " + " | ".join(rk) + " |", ""]
    lines.append("Columns: method and its own trainable parameters (head excluded; the classifier "
                 "head trains in every method). Bold: best mean per dataset. Cells: mean±std over "
                 "seeds (one seed: mean only).")
    if any(not table.complete(m) for m in table.methods):
        lines.append("\\* averaged over the datasets where the method has results.")
    return "\n".join(lines) + "\n"


def csv_block(table: Table) -> list[list]:
    out = [[table.title], ["dataset", "size", "train", "val", "test"]
           + [f"{m} {s}" for m in table.methods for s in ("mean", "std")],
           ["method params", "", "", "", ""] + [v for m in table.methods for v in (table.params[m], "")]]
    for d in table.datasets:
        s = table.sizes[d]
        line = [d, sum(s.values()), s.get("train"), s.get("val"), s.get("test")]
        for m in table.methods:
            c = table.cells.get((d, m))
            line += [_num(c.mean if c else None), _num(c.std if c else None)]
        out.append(line)
    ranks = table.ranks()
    out.append(["average", "", "", "", ""] + [v for m in table.methods for v in (_num(table.average(m)), "")])
    out.append(["average rank", "", "", "", ""] + [v for m in table.methods for v in (_num(ranks.get(m)), "")])
    return out


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def _csv(lines: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(lines)
    return buf.getvalue()


def summary_lines(tables: list[Table]) -> list[list]:
    out = [["model", "fraction", "pretrained", "metric", "dataset", "method", "method_params",
            "mean_pct", "std_pct", "n_seeds"]]
    for t in tables:
        for (d, m), c in sorted(t.cells.items()):
            out.append([t.model, t.fraction, t.pretrained, t.metric, d, m, t.params[m],
                        _num(c.mean), _num(c.std), c.n])
    return out


def write_tables(directory: str | Path, metric: str = "f1", out: str | Path | None = None) -> dict[str, Path]:
    """Render every table of the results under `directory`; returns the files written."""
    results = load_results(directory)
    if not results:
        raise FileNotFoundError(f"no run results (result.json) under {directory}")
    tables = build_tables(result_rows(results), metric)
    out = Path(out or directory)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "tables.md", "csv": out / "tables.csv", "summary": out / "summary.csv"}
    files["markdown"].write_text("\n".join(markdown(t) for t in tables))
    files["csv"].write_text("\n".join(_csv(csv_block(t)) for t in tables))
    files["summary"].write_text(_csv(summary_lines(tables)))
    return files


def leaderboard(rows: list[dict]) -> str:
    """Methods as rows, best first, per model: the demo's printed summary."""
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_model[r["model"]].append(r)
    parts = []
    for model, rs in sorted(by_model.items()):
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in rs:
            groups[r["method"]].append(r)
        lines = [f"{model} ({'pretrained' if rs[0]['pretrained'] else 'NOT pretrained: random init'}; "
                 f"{', '.join(sorted({r['dataset'] for r in rs}))}, 100% of the training data)",
                 f"  {'method':<22} {'F1 %':>10} {'acc %':>6} {'AUROC':>6} {'trainable':>10} "
                 f"{'% of model':>10} {'time s':>7}"]
        stats = []
        for m, g in groups.items():
            full = [r for r in g if r["fraction"] == 1.0] or g
            f1 = mean_std([r["f1"] for r in full])
            stats.append((f1[0] or 0.0, m, f1, full))
        for _, m, (mean, std, _n), g in sorted(stats, key=lambda t: -t[0]):
            f1 = f"{100 * mean:.1f}" + (f"±{100 * std:.1f}" if std is not None else "")
            acc = mean_std([r["accuracy"] for r in g])[0]
            auc = mean_std([r["auroc"] for r in g])[0]
            pct = 100 * g[0]["trainable"] / g[0]["total"]
            secs = sum(r["wall_time_s"] for r in g) / len(g)
            lines.append(f"  {m:<22} {f1:>10} {100 * acc:>6.1f} {'–' if auc is None else f'{auc:.3f}':>6} "
                         f"{human(g[0]['trainable']):>10} {pct:>9.2f}% {secs:>7.1f}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
