"""The model card (README.md) written next to a saved adapter."""

from __future__ import annotations

import json

from .report import Report


def model_card(config: dict, report: Report, tags: list[str] | None = None) -> str:
    base = config["base_model"]
    base_name = base.get("name") or base["class"]
    methods = [m["name"] for m in config["methods"]]
    all_tags = ["peftvision", "peft", *methods, *(tags or [])]
    front = ["---", "library_name: peftvision", f"base_model: {json.dumps(base_name)}", "tags:"]
    front += [f"- {t}" for t in dict.fromkeys(all_tags)]
    front.append("---")
    body = f"""
# {base_name} + {' + '.join(methods)} (peftvision adapter)

A parameter-efficient adapter for `{base_name}` ({base['class']}) made with
[peftvision](https://pypi.org/project/peftvision/) {config['peftvision_version']}.

| | parameters |
|---|---|
| trainable | {report.trainable:,} ({report.percent:.4f}%) |
| total | {report.total:,} |
{chr(10).join(f'| {k} | {v:,} |' for k, v in report.by_method.items())}

## Usage

```python
import peftvision as pv
model = ...  # build the base model `{base_name}` as you trained it
pv.load_adapter(model, "path/or/hub-repo")
```
"""
    return "\n".join(front) + "\n" + body
