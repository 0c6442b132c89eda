"""The paper-specific closing outputs of `reproduce`, from result files only:

    table3   one average rank across encoders (Dutt et al. Table 3: methods ranked per dataset
             and encoder, the ranks averaged over every (encoder, dataset) pair)
    figure3  F1 against trainable parameters, one panel per encoder, marker area ∝ parameters
    table4   FID per data volume (table4.py) and the Figure 2 image grids (figure2.py)
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from ..results import load_results, row
from ..table import average_ranks, build_tables, human


def combined_ranks(rows: list[dict], metric: str = "f1") -> tuple[dict[str, float | None], list[str]]:
    """method -> mean rank over every (model, dataset) at 100% data; and the pairs ranked."""
    per_pair: dict[str, dict[str, float | None]] = {}
    for t in build_tables(rows, metric):
        if t.fraction != 1.0:
            continue
        for d in t.datasets:
            per_pair[f"{t.model} · {d}"] = {m: t.cells[d, m].mean for m in t.methods if (d, m) in t.cells}
    return average_ranks(per_pair), sorted(per_pair)


def table3_markdown(rows: list[dict]) -> str:
    ranks, pairs = combined_ranks(rows)
    models = sorted({r["model"] for r in rows})
    lines = [f"### Average rank across encoders ({', '.join(models)}), test macro-F1, 100% data",
             "", "| method | average rank | ranked in |", "|---|---|---|"]
    for m, r in sorted(ranks.items(), key=lambda kv: (kv[1] is None, kv[1] or 0.0, kv[0])):
        lines.append(f"| {m} | {'–' if r is None else f'{r:.2f}'} | {len(pairs)} (encoder, dataset) pairs |")
    lines += ["", "Methods ranked per (encoder, dataset) by mean test macro-F1 over seeds (1 = best, ties "
              "share their mean rank), then averaged. Macro-F1 is our choice: the paper says F1."]
    return "\n".join(lines) + "\n"


def figure3(rows: list[dict], out: Path) -> list[Path]:
    from ..plot import _grid, _pyplot, _save

    plt = _pyplot()
    by_model: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["fraction"] == 1.0:
            by_model[r["model"]][r["method"]].append(r)
    fig, axes = _grid(plt, max(1, len(by_model)), width=6.0, height=4.5)
    biggest = max((r["trainable"] for r in rows), default=1)
    for ax, (model, methods) in zip(axes, sorted(by_model.items())):
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
        for method, rs in sorted(methods.items()):
            per_dataset: dict[str, list[float]] = defaultdict(list)
            for r in rs:
                per_dataset[r["dataset"]].append(r["f1"])
            f1 = 100 * sum(sum(v) / len(v) for v in per_dataset.values()) / len(per_dataset)
            params = sorted(r["trainable"] for r in rs)[len(rs) // 2]
            # area ∝ log-parameters, so 1K and 300M trainable both stay visible
            size = 20 + 400 * math.log10(max(params, 1)) / math.log10(max(biggest, 10))
            ax.scatter(params, f1, s=size, alpha=0.7, label=f"{method} ({human(params)})")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (incl. head, log)")
        ax.set_ylabel("test macro-F1 (%), mean over datasets")
        ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("F1 against trainable parameters, marker size = parameters (Dutt et al. Figure 3)")
    paths = _save(fig, out, "figure3_sized")
    plt.close(fig)
    return paths


def write_outputs(kind: str, directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if kind == "table4":
        from .figure2 import write_figure2
        from .table4 import write_table4

        return write_table4(directory) + write_figure2(directory)
    rows = [row(r) for r in load_results(directory) if r["metrics"]["test"]["macro_f1"] is not None]
    if kind == "table3":
        path = directory / "table3_combined_rank.md"
        path.write_text(table3_markdown(rows))
        print(path.read_text())
        return [path]
    if kind == "figure3":
        return figure3(rows, directory)
    return []
