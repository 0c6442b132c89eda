"""Generate docs/architectures.md from the architecture registry (kept current by tests/test_docs.py).

    python -m tools.architectures_page [--out docs/architectures.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

INTRO = """# Architectures

Generated from the code by `python -m tools.architectures_page`; do not edit by hand.

Model families peftvision recognises, and the default placement of each method on them. A family
is a registration (`peftvision.architectures.Architecture`): how it is recognised (module classes,
checked only when their package is already imported, and/or a structural test), its traits, and
method name -> default targets. The shipped ones are in `peftvision/families.py`. A model no
registration recognises is `generic`: methods then take explicit `targets=[...]` or a named set,
`targets="all-linear"` (every Linear outside the head) or `targets="all-conv"`.

```python
from peftvision.architectures import Architecture, register_architecture

register_architecture(Architecture(
    "my-net", classes=(("my_package.models", "MyNet"),),
    placements={"lora": r"encoder\\.layers\\.\\d+\\.attn\\.(q|v)_proj"},
    traits=frozenset({"norm", "layernorm", "attention"})))
```

| family | recognised as | methods placed with no targets |
| --- | --- | --- |
"""

OUTRO = """
Methods that run on the whole model (`full`, `bias`, `norm`, `svdiff`, `shpeft`, `spt`; `batchnorm`,
`layernorm` and `linear` where the family has those layers or a classifier head) need no
placement. `tests/test_matrix.py` tests every family x method cell on a tiny real model.
"""


def page() -> str:
    from peftvision.architectures import architectures

    rows = [f"| `{a.name}` | {a.description} | {', '.join(sorted(a.placements)) or '-'} |"
            for a in architectures().values()]
    return INTRO + "\n".join(rows) + "\n" + OUTRO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "architectures.md")
    args = parser.parse_args()
    args.out.write_text(page())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
