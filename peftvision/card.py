"""The model card (README.md with YAML metadata) written next to a saved adapter."""

from __future__ import annotations

import json

from .report import Report


def _usage(base: dict, architecture: str) -> str:
    name = base.get("name")
    if architecture in ("vit", "resnet") and name:
        build = f'import timm\nmodel = timm.create_model("{name}", pretrained=True, num_classes=...)'
    elif architecture == "unet" and name:
        build = ("from diffusers import UNet2DConditionModel\n"
                 f'model = UNet2DConditionModel.from_pretrained("{name}", subfolder="unet")')
    else:
        build = f"model = ...  # the base model: {base['class']}"
    return f"{build}\nimport peftvision as pv\npv.load_adapter(model, \"<this repo id or folder>\")"


def model_card(config: dict, report: Report, tags: list[str] | None = None,
               metrics: dict[str, float] | None = None) -> str:
    base = config["base_model"]
    base_name = base.get("name") or base["class"]
    methods = [m["name"] for m in config["methods"]]
    all_tags = dict.fromkeys(["peftvision", "peft", *methods, *(tags or [])])
    front = ["---", "library_name: peftvision"]
    if base.get("name"):
        front.append(f"base_model: {json.dumps(base['name'])}")
    front += ["tags:", *(f"- {t}" for t in all_tags), "---"]
    rows = [f"| trainable | {report.trainable:,} ({report.percent:.4f}%) |",
            f"| total | {report.total:,} |",
            *(f"| {k} | {v:,} |" for k, v in report.by_method.items())]
    metric_rows = "".join(f"| {k} | {v:.4g} |\n" for k, v in (metrics or {}).items())
    metric_table = f"\n## Metrics\n\n| metric | value |\n|---|---|\n{metric_rows}" if metrics else ""
    return "\n".join(front) + f"""

# {base_name} + {' + '.join(methods)}

A parameter-efficient adapter for `{base_name}` (`{base['class']}`), made with peftvision
{config['peftvision_version']}. Only the trained tensors are stored.

| parameters | count |
|---|---|
{chr(10).join(rows)}
{metric_table}
## Usage

```python
{_usage(base, config.get('architecture', ''))}
```
"""
