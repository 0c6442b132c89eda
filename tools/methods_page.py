"""Generate docs/methods.md from the code: every registered method, what it trains, where, its
paper, the architectures it supports, whether it merges, and its parameter counts on the paper
models (counted on the meta device, so nothing is downloaded or allocated).

    python -m tools.methods_page [--out docs/methods.md]
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import peftvision as pv
from benchmarks.param_counts import human, measure, needs_data  # the counting the benchmarks use

MODELS = ["resnet50", "vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"]
SHORT = {"resnet50": "ResNet-50", "vit_base_patch16_224": "ViT-B/16",
         "vit_large_patch16_224": "ViT-L/16", "vit_huge_patch14_224": "ViT-H/14"}


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


def counts_table(methods: list[str]) -> str:
    header = ["| method | " + " | ".join(SHORT[m] for m in MODELS) + " |",
              "| --- |" + " ---: |" * len(MODELS)]
    rows = []
    for method in methods:
        cells = []
        for model in MODELS:
            if needs_data(method):
                cells.append("data-chosen")
                continue
            cell = measure(model, method, 1000, "meta", 0)
            cells.append(human(cell["method_params"], cell["method_percent_of_base"])
                         if "trainable" in cell else "n/a")
        rows.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(header + rows)


def page() -> str:
    methods = list(pv.methods())
    return "\n".join([
        "# Methods",
        "",
        "Generated from the code by `python -m tools.methods_page`; do not edit by hand.",
        "",
        "## Trainable parameters on the paper models",
        "",
        "Parameters each method adds or selects with its default options (the classifier head, "
        "which trains too, is left out; % of the base model). n/a: the method does not support "
        "the architecture. `shpeft` trains exactly its budget (default 1% of the backbone); "
        "`spt`'s count depends on the data it is given.",
        "",
        counts_table(methods),
        "",
        *(describe(m) for m in methods),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/methods.md"))
    args = parser.parse_args(argv)
    args.out.write_text(page())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
