"""Dutt et al. Table 4 from text-to-image result files: FID per training-data volume (mean ± std
over seeds), the average FID over volumes and the average rank (1 = lowest FID), per model.

    python -m benchmarks.reproduce.table4 DIR      # writes DIR/table4.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from ..metrics import mean_std
from ..results import KIND
from ..table import rank_within


def text_to_image_results(directory: str | Path) -> Iterator[tuple[Path, dict]]:
    """(path, result) of every readable text-to-image result.json under `directory`; other and
    broken files are skipped."""
    for path in sorted(Path(directory).rglob("result.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and r.get("kind") == KIND and r.get("task") == "text-to-image":
            yield path, r


def load_generation(directory: str | Path) -> list[dict]:
    """(model, dataset, method, fraction, seed, fid, fid_kind) of every text-to-image result."""
    rows = []
    for _, r in text_to_image_results(directory):
        fid_key = next((k for k in r["metrics"] if k.startswith("fid_")), None)
        if fid_key is None or r["metrics"][fid_key] is None:
            continue
        rows.append({"model": r["model"]["name"], "dataset": r["dataset"]["name"],
                     "method": r["method"]["label"], "fraction": r["config"].get("fraction", 1.0),
                     "seed": r["config"]["seed"], "fid": r["metrics"][fid_key], "fid_kind": fid_key,
                     "n_train": r["dataset"]["split"]["n_train"]})
    return rows


def markdown(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["model"], r["dataset"], r["fid_kind"]].append(r)
    out = []
    for (model, dataset, kind), rs in sorted(groups.items()):
        fractions = sorted({r["fraction"] for r in rs}, reverse=True)
        images = {f: max(r["n_train"] for r in rs if r["fraction"] == f) for f in fractions}
        cells: dict[tuple[str, float], tuple] = {}
        values: dict[tuple[str, float], list[float]] = defaultdict(list)
        for r in rs:
            values[r["method"], r["fraction"]].append(r["fid"])
        for key, vs in values.items():
            cells[key] = mean_std(vs)
        methods = sorted({r["method"] for r in rs})
        ranks: dict[str, list[float]] = defaultdict(list)
        for f in fractions:  # lower FID is better: rank the negated means
            scores = {m: -cells[m, f][0] for m in methods if (m, f) in cells}
            for m, rank in rank_within(scores).items():
                ranks[m].append(rank)
        head = " | ".join(f"{images[f]:,} images ({f:.0%})" for f in fractions)
        out += [f"### {dataset} · {model}: {kind} (lower is better), mean ± std over seeds", "",
                f"| method | {head} | average FID | average rank |",
                "|---" * (len(fractions) + 3) + "|"]
        for m in methods:
            row = []
            for f in fractions:
                mean, std, _ = cells.get((m, f), (None, None, 0))
                row.append("–" if mean is None else f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else ""))
            means = [cells[m, f][0] for f in fractions if (m, f) in cells]
            avg = sum(means) / len(means) if means else None
            rank = sum(ranks[m]) / len(ranks[m]) if ranks[m] else None
            out.append(f"| {m} | {' | '.join(row)} | {'–' if avg is None else f'{avg:.2f}'} | "
                       f"{'–' if rank is None else f'{rank:.2f}'} |")
        out += [""]
    return "\n".join(out)


def write_table4(directory: str | Path, out: str | Path | None = None) -> list[Path]:
    rows = load_generation(directory)
    if not rows:
        return []
    Path(out or directory).mkdir(parents=True, exist_ok=True)
    path = Path(out or directory) / "table4.md"
    path.write_text(markdown(rows))
    print(path.read_text())
    return [path]


if __name__ == "__main__":
    written = write_table4(sys.argv[1])
    print("\n".join(f"wrote {p}" for p in written) or "no text-to-image results")
