"""Dutt et al. Figure 2 from text-to-image result files: generated images per method for the same
prompts and seed, rows = methods, columns = prompts, the real test image of each prompt on top.

Every `generate` run keeps its first prompts' images (result["samples"], files under the run's
samples/): prompt i comes from the i-th image of the fixed FID test set and image i from the i-th
draw of the run seed's generator, so runs with one split and one seed line up across methods.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path

from .table4 import text_to_image_results

COLUMNS = 4  # prompts shown


def load_samples(directory: str | Path) -> list[dict]:
    """(model, dataset, method, fraction, seed, test_sha256, samples, run dir) of every text-to-image
    result that kept samples."""
    out = []
    for path, r in text_to_image_results(directory):
        if not r.get("samples"):
            continue
        out.append({"model": r["model"]["name"], "dataset": r["dataset"]["name"],
                    "method": r["method"]["label"], "fraction": r["config"].get("fraction", 1.0),
                    "seed": r["config"]["seed"], "test": r["dataset"]["split"].get("test_sha256"),
                    "samples": r["samples"], "dir": path.parent})
    return out


def panels(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(model, dataset, fraction, seed, test set) -> method -> row: one figure per data volume,
    from its smallest seed (runs of one seed share prompts and starting noise)."""
    first_seed: dict[tuple, int] = {}
    for r in rows:
        key = (r["model"], r["dataset"], r["fraction"], r["test"])
        first_seed[key] = min(first_seed.get(key, r["seed"]), r["seed"])
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in sorted(rows, key=lambda r: (-r["fraction"], str(r["dir"]))):
        if r["seed"] == first_seed[r["model"], r["dataset"], r["fraction"], r["test"]]:
            groups[r["model"], r["dataset"], r["fraction"], r["seed"], r["test"]].setdefault(r["method"], r)
    return dict(groups)


def figure2(rows: list[dict], out: Path, columns: int = COLUMNS) -> list[Path]:
    """figure2_<dataset>_f<fraction>_s<seed>.png for every group of `panels`."""
    from PIL import Image

    from ..plot import _pyplot

    plt = _pyplot()
    written = []
    for (model, dataset, fraction, seed, _), by_method in panels(rows).items():
        methods = sorted(by_method)
        n = min(columns, min(len(r["samples"]) for r in by_method.values()))
        prompts = [s["prompt"] for s in by_method[methods[0]]["samples"][:n]]
        if any([s["prompt"] for s in r["samples"][:n]] != prompts for r in by_method.values()):
            raise ValueError(f"{dataset} f{fraction:g} s{seed}: runs disagree on the prompts; "
                             "were they made with different --split-seed or --test-images?")
        first = by_method[methods[0]]
        real = [first["dir"] / s["real"] if s.get("real") else None for s in first["samples"][:n]]
        rows_ = [("real (test image)", real)] + [
            (m, [by_method[m]["dir"] / s["generated"] for s in by_method[m]["samples"][:n]]) for m in methods]
        fig, axes = plt.subplots(len(rows_), n, figsize=(2.2 * n + 1.2, 2.2 * len(rows_) + 0.8), squeeze=False)
        for i, (label, files) in enumerate(rows_):
            for j, f in enumerate(files):
                ax = axes[i][j]
                if f is not None:
                    ax.imshow(Image.open(f))
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(textwrap.fill(prompts[j], 28)[:160], fontsize=6)
                if j == 0:
                    ax.set_ylabel(label, fontsize=8)
        fig.suptitle(f"{dataset} · {model}: {fraction:.0%} of the training data, seed {seed} "
                     "(Dutt et al. Figure 2 layout)", fontsize=9)
        fig.tight_layout()
        path = out / f"figure2_{dataset}_f{fraction:g}_s{seed}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_figure2(directory: str | Path, out: str | Path | None = None) -> list[Path]:
    rows = load_samples(directory)
    if not rows:
        return []
    out = Path(out or directory)
    out.mkdir(parents=True, exist_ok=True)
    return figure2(rows, out)
