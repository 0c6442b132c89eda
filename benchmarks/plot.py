"""The papers' figures, from the run JSONs (matplotlib, Agg backend: no display needed).

    python -m benchmarks plot DIR [--out DIR]

figure1_data_volume.{png,svg}   Dutt et al. Figure 1: test macro-F1 against the fraction of the
                                training data (log x), one line per method (± std over seeds as
                                a band), one panel per (model, dataset).
figure3_parameters.{png,svg}    Figure 3: test macro-F1 (averaged over datasets, full training
                                data) against trainable parameters (log x), one panel per model.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .metrics import mean_std
from .results import load_results
from .results import rows as result_rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, n: int, width: float = 5.0, height: float = 3.8):
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths


def figure_data_volume(rows: list[dict], out: Path) -> list[Path]:
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    panels: dict[tuple, dict[str, dict[float, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        panels[r["model"], r["dataset"]][r["method"]][r["fraction"]].append(r["f1"])
    swept = {k: v for k, v in panels.items() if len({f for m in v.values() for f in m}) > 1}
    panels = swept or panels  # panels with a data-volume sweep, when there are any
    fig, axes = _grid(plt, len(panels))
    for ax, ((model, dataset), methods) in zip(axes, sorted(panels.items())):
        fractions = sorted({f for m in methods.values() for f in m})
        if len(fractions) > 1:  # lines only: methods run at a single fraction are left out
            methods = {m: v for m, v in methods.items() if len(v) > 1}
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
        for method, by_fraction in sorted(methods.items()):
            xs = sorted(by_fraction)
            stats = [mean_std(by_fraction[x]) for x in xs]
            ys = [100 * s[0] for s in stats]
            sd = [100 * (s[1] or 0.0) for s in stats]
            line, = ax.plot([100 * x for x in xs], ys, marker="o", label=method)
            ax.fill_between([100 * x for x in xs], [y - s for y, s in zip(ys, sd)],
                            [y + s for y, s in zip(ys, sd)], color=line.get_color(), alpha=0.15)
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}%" for f in fractions])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training data used")
        ax.set_ylabel("test macro-F1 (%)")
        ax.set_title(f"{dataset} · {model}", fontsize=10)
        ax.grid(alpha=0.3)
        if len(fractions) < 2:
            ax.text(0.5, 0.02, "one data fraction only: run data-volume sweeps for lines",
                    transform=ax.transAxes, ha="center", fontsize=7, color="grey")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("F1 against data volume (Dutt et al. Figure 1 layout)")
    paths = _save(fig, out, "figure1_data_volume")
    plt.close(fig)
    return paths


def figure_parameters(rows: list[dict], out: Path) -> list[Path]:
    """Average over datasets at the largest data fraction each (model, method) has."""
    plt = _pyplot()
    by_model: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_model[r["model"]][r["method"]].append(r)
    fig, axes = _grid(plt, len(by_model), width=6.0, height=4.5)
    for ax, (model, methods) in zip(axes, sorted(by_model.items())):
        points: dict[tuple[int, float], list[str]] = defaultdict(list)
        for method, rs in sorted(methods.items()):
            top = max(r["fraction"] for r in rs)
            rs = [r for r in rs if r["fraction"] == top]
            per_dataset = defaultdict(list)
            for r in rs:
                per_dataset[r["dataset"]].append(r["f1"])
            f1 = sum(mean_std(v)[0] for v in per_dataset.values()) / len(per_dataset)
            params = sorted(r["trainable"] for r in rs)[len(rs) // 2]
            points[params, round(100 * f1, 6)].append(method)  # equal results share a point
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
        for (params, f1), names in points.items():
            ax.scatter(params, f1, s=30)
            ax.annotate(" = ".join(names), (params, f1), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (incl. head, log)")
        ax.set_ylabel("test macro-F1 (%), mean over datasets")
        ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("F1 against trainable parameters (Dutt et al. Figure 3 layout)")
    paths = _save(fig, out, "figure3_parameters")
    plt.close(fig)
    return paths


def write_plots(directory: str | Path, out: str | Path | None = None) -> list[Path]:
    results = load_results(directory)
    if not results:
        raise FileNotFoundError(f"no run results (result.json) under {directory}")
    rows = [r for r in result_rows(results) if r["f1"] is not None]
    out = Path(out or directory)
    out.mkdir(parents=True, exist_ok=True)
    return figure_data_volume(rows, out) + figure_parameters(rows, out)
