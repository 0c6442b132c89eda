"""SV-Diff's state on the SD-1.5 UNet (issue 16): the UNet's tensors plus the SVD factors and δ
SV-Diff keeps, for each `factors` layout, against the bare UNet.

Counted from tensor sizes on the meta device: no weight is allocated and no SVD runs (seconds;
the real SVDs take minutes). The conditioning check needs singular values, so on meta every
layer counts as well-conditioned; tests/test_svdiff_memory.py (slow) checks a built UNet.

    python -m benchmarks.perf.compare --model none --no-apply-timing --svdiff-state --out FILE.json
"""

from __future__ import annotations

import copy
from typing import Any

LIMIT = 1.5  # issue 16: the UNet with SV-Diff's state in at most 1.5x the bare UNet's memory


def measure() -> dict[str, Any]:
    import peftvision as pv
    from peftvision.methods.svdiff import FACTORS, SpectralShift

    base = pv.create_model("sd15-unet", meta=True)
    base_bytes = sum(t.numel() * t.element_size() for t in base.parameters())
    rows = []
    for factors in FACTORS:
        model = pv.apply(copy.deepcopy(base), "svdiff", factors=factors)
        total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        shifted = [m for m in model.modules() if isinstance(m, SpectralShift) and m.svd_s is not None]
        rows.append({"factors": factors, "total_bytes": total, "ratio": total / base_bytes,
                     "layers": len(shifted),
                     "one_factor_layers": sum(m.svd_u is None or m.svd_vh is None for m in shifted)})
    return {"model": "sd15-unet (meta device)", "base_bytes": base_bytes, "rows": rows}


def table(state: dict[str, Any]) -> list[str]:
    gb = 1e9
    lines = ["## SV-Diff state on the SD-1.5 UNet", "",
             f"{state['model']}: {state['base_bytes'] / gb:.2f} GB of weights; counted from tensor "
             "sizes (every layer taken as well-conditioned: the real-SVD check is a slow test).", "",
             "| factors | layers with one factor | total GB | vs the UNet |", "|---|---|---|---|"]
    for r in state["rows"]:
        lines.append(f"| {r['factors']} | {r['one_factor_layers']} of {r['layers']} | "
                     f"{r['total_bytes'] / gb:.2f} | {r['ratio']:.2f} |")
    return lines


def targets(state: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = {r["factors"]: r for r in (state or {}).get("rows", [])}
    if "auto" not in rows:
        return []
    r, both = rows["auto"], rows.get("both", {})
    return [{"target": f"svdiff state (factors=auto) <= {LIMIT:.2f}x the UNet", "model": "sd15-unet",
             "measured": r["ratio"], "limit": LIMIT, "met": r["ratio"] <= LIMIT,
             "note": f"{r['total_bytes'] / 1e9:.2f} GB; both factors kept: "
                     f"{both.get('total_bytes', 0) / 1e9:.2f} GB ({both.get('ratio', 0):.2f}x)"}]
