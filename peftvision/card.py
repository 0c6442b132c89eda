"""The model card (README.md with YAML metadata) written next to a saved adapter.

Built with huggingface_hub's ModelCard / ModelCardData, so metadata is real YAML: tags and
names are escaped, never spliced into the text."""

from __future__ import annotations

from .report import Report

CARD_MARKER = "library_name: peftvision"  # how a card we wrote is recognised (and may be replaced)


def _usage(base: dict, architecture: str) -> str:
    name = base.get("hub_id") or base.get("name")
    if architecture in ("vit", "resnet") and base.get("name"):
        build = f'import timm\nmodel = timm.create_model({_timm_name(base)!r}, pretrained=True, num_classes=...)'
    elif architecture == "unet" and name:
        build = ("from diffusers import UNet2DConditionModel\n"
                 f'model = UNet2DConditionModel.from_pretrained({name!r}, subfolder="unet")')
    else:
        build = f"model = ...  # the base model: {base['class']}"
    return f"{build}\nimport peftvision as pv\npv.load_adapter(model, \"<this repo id or folder>\")"


def _timm_name(base: dict) -> str:
    """timm's model name with its pretrained tag (e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k)."""
    tag = base.get("pretrained_tag")
    return f"{base['name']}.{tag}" if tag else base["name"]


def _cell(text: object) -> str:
    """A value safe inside a Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def check_card_arguments(tags: object, metrics: object) -> None:
    """Raise ValueError for tags/metrics a card cannot hold, before anything is written."""
    import math

    if tags is not None and (not isinstance(tags, (list, tuple))
                             or not all(isinstance(t, str) and t.strip() for t in tags)):
        raise ValueError(f"tags must be a list of non-empty strings, got {tags!r}")
    if metrics is not None:
        if not isinstance(metrics, dict):
            raise ValueError(f"metrics must be a dict of name -> number, got {metrics!r}")
        for key, value in metrics.items():
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value))
            if not isinstance(key, str) or not ok:
                raise ValueError(f"metrics must map names to finite numbers; {key!r}: {value!r} "
                                 "is not one")


def model_card(config: dict, report: Report, tags: list[str] | None = None,
               metrics: dict[str, float] | None = None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    base = config["base_model"]
    base_name = base.get("name") or base["class"]
    methods = [m["name"] for m in config["methods"]]
    data = ModelCardData(library_name="peftvision", base_model=base.get("hub_id") or None,
                         tags=list(dict.fromkeys(["peftvision", "peft", *methods, *(tags or [])])))
    rows = [f"| trainable | {report.trainable:,} ({report.percent:.4f}%) |",
            f"| total | {report.total:,} |",
            *(f"| {_cell(k)} | {v:,} |" for k, v in report.by_method.items())]
    metric_rows = "".join(f"| {_cell(k)} | {v:.4g} |\n" for k, v in (metrics or {}).items())
    metric_table = f"\n## Metrics\n\n| metric | value |\n|---|---|\n{metric_rows}" if metrics else ""
    body = f"""
# {_cell(base_name)} + {' + '.join(methods)}

A parameter-efficient adapter for `{_cell(base_name)}` (`{base['class']}`), made with peftvision
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
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
