"""Run the generated conformance matrix (family x method variant on the tiny zoo) and record it.

    python -m tools.matrix [--out docs/matrix.json]

Each cell runs tests/matrix_cell.check_cell, the checks tests/test_matrix.py asserts, and is
recorded as pass, refused (with the reason the library gives), mismatch (a check failed) or
crash (any other exception). The results go to docs/matrix.json; docs/architectures.md is then
regenerated from it (tools/architectures_page.py). Single process, a few minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "matrix.json"
STATUSES = ("pass", "refused", "crash", "mismatch")


def run_matrix(only: str | None = None) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))  # the tiny zoo and the shared cell checks live there
    import torch
    from matrix_cell import ZOO, check_cell, variants

    torch.set_num_threads(1)
    columns = [(label, cls, options) for label, cls, options in variants()]
    cells: dict[str, dict[str, dict]] = {}
    start = time.perf_counter()
    for family in ZOO:
        if only and family != only:
            continue
        row = cells.setdefault(family, {})
        for label, cls, options in columns:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    status, why = check_cell(family, label, cls, options, Path(tmp))
                    merge = ("not mergeable" if not cls.mergeable else f"refused: {why}" if why
                             else "exact") if status == "pass" else ""
                    row[label] = {"status": status, "why": why if status == "refused" else "",
                                  "merge": merge}
                except AssertionError as exc:
                    row[label] = {"status": "mismatch", "why": f"{exc}"[:300] or traceback.format_exc(limit=2)}
                except Exception as exc:  # noqa: BLE001 - a crash is what the matrix reports
                    row[label] = {"status": "crash", "why": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"{family:>15} {label:<16} {row[label]['status']}", flush=True)
    counts = {s: sum(c["status"] == s for row in cells.values() for c in row.values()) for s in STATUSES}
    import diffusers
    import timm

    return {"command": "python -m tools.matrix", "versions": {"torch": torch.__version__.split("+")[0],
                                                               "timm": timm.__version__,
                                                               "diffusers": diffusers.__version__},
            "methods": [label for label, _c, _o in columns], "counts": counts, "cells": cells,
            "seconds": round(time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--family", help="run one family only (printed, not written)")
    args = parser.parse_args()
    results = run_matrix(args.family)
    print(json.dumps(results["counts"]), f"in {results['seconds']} s")
    if args.family:
        return
    args.out.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    from tools import architectures_page

    page = ROOT / "docs" / "architectures.md"
    page.write_text(architectures_page.page(args.out))
    print(f"wrote {args.out} and {page}")


if __name__ == "__main__":
    main()
