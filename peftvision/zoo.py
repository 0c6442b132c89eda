"""Build base models by name (pv.create_model, pv.load_local_weights): for the command line, the
benchmarks and users who name models the way the CLI does.

"NAME" or "timm:NAME"            a timm model (pretrained weights from the Hub, or a local file)
"diffusers:ID_OR_DIR"            a diffusers UNet2DConditionModel (config or weights, `subfolder`)
"sd15-unet"                      the Stable Diffusion 1.5 UNet configuration, built locally
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

# The SD-1.5 UNet: diffusers' UNet2DConditionModel defaults plus these (the v1-5 config.json).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32)


def create_model(spec: str, *, pretrained: bool = False, num_classes: int | None = None,
                 weights: str | None = None, image_size: int | None = None,
                 meta: bool = False) -> nn.Module:
    """A base model from a name. `weights`: a local .safetensors/.pth file for timm models.
    `meta=True` builds without allocating weights (for parameter counts)."""
    import torch

    if meta:
        with torch.device("meta"):
            return create_model(spec, pretrained=False, num_classes=num_classes)
    if spec == "sd15-unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**SD15_UNET)
    if spec.startswith("diffusers:"):
        return _diffusers_unet(spec.removeprefix("diffusers:"), pretrained)
    import timm

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if image_size is not None:
        kwargs["img_size"] = image_size  # ViTs: position embeddings sized (and resampled) for it
    model = timm.create_model(spec.removeprefix("timm:"), pretrained=pretrained and not weights, **kwargs)
    if weights:
        load_local_weights(model, weights)
    return model


def load_local_weights(model: nn.Module, path: str | Path) -> dict:
    """Load a local state-dict file (.safetensors/.pth/.bin) into a timm model instead of the
    Hub's weights, through the model's own checkpoint filter (layout conversion, position-embedding
    resampling). Tensors of another shape (an old head) are skipped; a file that fits less than
    half of the model's tensors is refused rather than leaving the model silently random.
    Returns what loaded, what was skipped and what is missing."""
    import sys

    from timm.models import load_state_dict

    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = load_state_dict(str(path))
    except Exception as exc:
        raise ValueError(f"cannot read weights file {path}: {exc}") from exc
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is not None:
        try:
            state = convert(state, model)
        except Exception:  # not in the layout the filter expects: use the file as it is
            pass
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(keep) < len(own) // 2:
        example = ", ".join(sorted(set(state) - set(own))[:3])
        raise ValueError(f"{path} fits only {len(keep)} of the {len(own)} tensors of "
                         f"{type(model).__name__} (unmatched names such as {example}): weights for "
                         "another model?")
    missing = model.load_state_dict(keep, strict=False).missing_keys
    return {"file": str(path), "loaded": len(keep), "skipped": sorted(set(state) - set(keep)),
            "missing": sorted(missing)}


def _diffusers_unet(source: str, pretrained: bool) -> nn.Module:
    from diffusers import UNet2DConditionModel

    path = Path(source)
    if path.suffix == ".json":  # a config file: architecture only
        return UNet2DConditionModel.from_config(json.loads(path.read_text()))
    subfolder = "unet" if (path / "unet").is_dir() or not path.exists() else None
    if pretrained:
        return UNet2DConditionModel.from_pretrained(source, subfolder=subfolder)
    config = UNet2DConditionModel.load_config(source, subfolder=subfolder)
    return UNet2DConditionModel.from_config(config)
