"""Generate docs/methods.md from the code: every registered method, what it trains, where, its
paper, the architectures it supports, whether it merges, and its parameter counts on the paper
models (peftvision/method_counts.py, made by `python -m tools.method_counts`) beside the counts
its papers report.

    python -m tools.methods_page [--out docs/methods.md]
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import peftvision as pv
from benchmarks.param_counts import needs_data  # the rule tools/method_counts.py counts by
from peftvision.method_counts import BASE_PARAMS, MODELS
from peftvision.registry import PAPER_MODELS, MethodInfo


def human(n: int, base: int | None = None) -> str:
    """e.g. 0.29M (0.34%), 26.6k (0.104%), 0 (0%); the percentage of `base` when given."""
    if n == 0:
        return "0 (0%)" if base else "0"
    size = f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}k" if n >= 1000 else str(n)
    if not base:
        return size
    percent = 100.0 * n / base
    return f"{size} ({percent:.2f}%)" if percent >= 0.1 else f"{size} ({percent:.3f}%)"


def count_cell(info: MethodInfo, model: str) -> str:
    """The table cell of `info` on `model`: a count, n/a (not supported) or data-chosen."""
    if needs_data(info.name):
        return "data-chosen"
    if not info.counts:
        return "not counted"  # registered after peftvision/method_counts.py was generated
    n = info.count(model)
    return "n/a" if n is None else human(n, dict(zip(MODELS, BASE_PARAMS)).get(model))


def describe(name: str) -> str:
    cls = pv.get_method(name)
    info = cls.info()
    module_doc = inspect.getdoc(inspect.getmodule(cls)) or ""
    lines = [f"## `{name}`", "", info.summary + ".", ""]
    if module_doc and not module_doc.startswith("Selective methods"):
        lines += [module_doc, ""]
    lines += [f"- kind: {info.kind}; merges into the base weights: {'yes' if info.mergeable else 'no'}",
              f"- architectures: {', '.join(info.architectures)}"]
    if info.aliases:
        lines.append(f"- aliases: {', '.join(info.aliases)}")
    if info.paper:
        lines.append(f"- paper: {info.paper}")
    options = [f"`{f}`" for f in inspect.signature(cls).parameters]
    lines += [f"- options: {', '.join(options) or 'none'}", ""]
    return "\n".join(lines)


def counts_table(infos: list[MethodInfo]) -> str:
    header = ["| method | " + " | ".join(PAPER_MODELS.values()) + " |",
              "| --- |" + " ---: |" * len(PAPER_MODELS)]
    rows = [f"| `{info.name}` | " + " | ".join(count_cell(info, m) for m in PAPER_MODELS) + " |"
            for info in infos]
    return "\n".join(header + rows)


def reported_table(infos: list[MethodInfo]) -> str:
    rows = ["| method | model | paper reports | source | our options | ours |",
            "| --- | --- | ---: | --- | --- | ---: |"]
    for info in infos:
        for r in info.reported:
            options = ", ".join(f"{k}={v!r}" for k, v in r.options_dict().items())
            ours = "not counted" if r.ours is None else human(r.ours)
            rows.append(f"| `{info.name}` | {PAPER_MODELS[r.model]} | {r.figure} | {r.source} | "
                        f"{options or 'defaults'} | {ours} |")
    return "\n".join(rows)


def page() -> str:
    infos = list(pv.methods().values())
    return "\n".join([
        "# Methods",
        "",
        "Generated from the code by `python -m tools.methods_page`; do not edit by hand.",
        "",
        "## Trainable parameters on the paper models",
        "",
        "Parameters each method adds or selects with its default options, as `pv.methods()` "
        "reports them (`MethodInfo.counts`): timm models built with `pretrained=False` and 1,000 "
        "classes on the meta device, the classifier head (which trains too) left out; % of the "
        "base model. n/a: the method does not run on the model with its defaults. `shpeft` "
        "trains exactly its budget (default 1% of the backbone); `spt`'s count depends on the "
        "data it is given.",
        "",
        counts_table(infos),
        "",
        "## Counts the papers report",
        "",
        "Where a paper prints a method's trainable parameters on these models, with the options "
        "that reproduce its setting and our count with them (`MethodInfo.reported`). Only "
        "figures confirmed in the papers' text are listed (docs/benchmarks.md); the others are "
        "left out rather than guessed.",
        "",
        reported_table(infos),
        "",
        *(describe(info.name) for info in infos),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/methods.md"))
    args = parser.parse_args(argv)
    args.out.write_text(page())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
