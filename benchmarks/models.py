"""Base models by name and PEFT methods on them, for the benchmark runs.

Models: any timm name (pretrained from the Hub, or from a local weights file), or one of the tiny
presets below: real timm classes (ResNet, VisionTransformer) small enough for CPU demos and tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

import peftvision as pv

# Tiny timm models for the offline demo and the tests (no pretrained weights exist for them).
TINY = {
    # zero_init_last=False: with the last BN of each block at γ=0 (timm's default, for training
    # from scratch) a frozen random backbone's residual branches are dead and PEFT there learns nothing.
    "tiny-resnet": dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16,
                        zero_init_last=False),
    "tiny-vit": dict(patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
}


# The tiny presets' default input size: the offline demo's generated images (presets.DEMO_RUN).
TINY_IMAGE_SIZE = 32


def default_image_size(name: str) -> int:
    """The input size a model's weights were trained at (timm's pretrained_cfg, no download);
    TINY_IMAGE_SIZE for the tiny presets; 224 when timm does not say."""
    if name in TINY:
        return TINY_IMAGE_SIZE
    import timm

    try:  # the tag counts: convnext_tiny.fb_in22k_ft_in1k_384 is 384 px
        cfg = timm.get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag: building the model will say so
        cfg = None
    size = getattr(cfg, "input_size", None)
    return int(size[-1]) if size else 224


class ModelError(ValueError):
    """A model that cannot be built as asked (unknown name, weights missing or offline)."""


def build_model(name: str, num_classes: int, image_size: int, *, pretrained: bool) -> nn.Module:
    """A timm model (Hub weights if `pretrained`) with a fresh `num_classes` head; ViTs are built
    for `image_size` inputs. Local weights files: `load_weights` afterwards."""
    if name in TINY:
        if pretrained:
            raise ModelError(f"{name} has no pretrained weights: use --no-pretrained or --weights FILE")
        return _tiny(name, num_classes, image_size)
    return _timm(name, num_classes, image_size, pretrained)


def _timm(name: str, num_classes: int, image_size: int, pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ModelError(f"unknown timm model {name!r} (and not one of {', '.join(TINY)})")
    kwargs: dict = {"num_classes": num_classes}
    default = timm.get_pretrained_cfg(name.split(".")[0])
    if default is not None and tuple(default.input_size[1:]) != (image_size, image_size):
        kwargs["img_size"] = image_size  # ViTs take it (pos-embed resampled); CNNs don't need it
    from peftvision.hub import offline_if_unreachable

    try:
        # An unreachable Hub: the cache is read at once, not after a minute of retries.
        with offline_if_unreachable() if pretrained else contextlib.nullcontext() as offline:
            try:
                return timm.create_model(name, pretrained=pretrained, **kwargs)
            except TypeError as e:
                if "img_size" not in str(e):
                    raise
                kwargs.pop("img_size")
                return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as e:  # no network, no cache
        if pretrained:
            why = f"offline: {offline}" if offline else f"{type(e).__name__}: {e}"
            raise ModelError(f"could not get pretrained weights for {name!r} ({why}). "
                             "Offline? Pass --weights FILE (a .safetensors/.pth state dict) or "
                             "--no-pretrained") from e
        raise


def _tiny(name: str, num_classes: int, image_size: int) -> nn.Module:
    if name == "tiny-resnet":
        from timm.models.resnet import BasicBlock, ResNet

        return ResNet(block=BasicBlock, num_classes=num_classes, **TINY[name])
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(TINY[name])
    if image_size % cfg["patch_size"]:
        raise ModelError(f"tiny-vit needs an image size divisible by {cfg['patch_size']}, got {image_size}")
    return VisionTransformer(img_size=image_size, num_classes=num_classes, **cfg)


def load_weights(model: nn.Module, path: str) -> dict:
    """Load a local weights file into `model` (peftvision.load_local_weights: the model's own
    timm checkpoint filter, old heads skipped, files for another model refused)."""
    try:
        return pv.load_local_weights(model, path)
    except (OSError, ValueError) as e:
        raise ModelError(str(e)) from e


def data_config(model: nn.Module) -> dict:
    """The mean/std the model's weights expect (ImageNet's when the model does not say)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {"mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
            "std": list(cfg.get("std", (0.229, 0.224, 0.225)))}


# -- methods -------------------------------------------------------------------------------------
def method_names(method: str | Iterable[str]) -> list[str]:
    """'lora', 'bias+norm' or ['bias', 'norm'] -> canonical registered names (aliases resolved)."""
    parts = method.split("+") if isinstance(method, str) else [p for m in method for p in m.split("+")]
    return [pv.get_method(p.strip()).name for p in parts if p.strip()]


def needs_data(name: str) -> bool:
    """Whether a method chooses its parameters from data (SH-PEFT, SPT): a `data` config field."""
    return any(f.name == "data" for f in dataclasses.fields(pv.get_method(name)))


def method_configs(names: list[str], options: dict, data: Iterable | None) -> list:
    """Config objects for pv.apply. One method: `options` are its keyword options; several:
    `options` maps method name -> its options. Data-driven methods get `data` (one pass)."""
    configs = []
    for name in names:
        opts = dict(options) if len(names) == 1 else dict(options.get(name, {}))
        if len(names) > 1 and set(options) - set(names):
            raise pv.ConfigError(f"with several methods, method_options maps method names to options; "
                                 f"got keys {sorted(set(options) - set(names))} for methods {names}")
        if needs_data(name) and "data" not in opts and opts.get("selection") is None:
            opts["data"] = data
        configs.append(pv.config(name, **opts))
    return configs


def classification_methods() -> dict[str, tuple[str, ...]]:
    """Registered methods that classify (support 'vit' and/or 'resnet'): name -> architectures."""
    return {name: info.architectures for name, info in pv.methods().items()
            if {"vit", "resnet"} & set(info.architectures)}


def unsupported(model_name: str, method: str | list[str], image_size: int = 224) -> str | None:
    """Why `method` cannot run on `model_name` (pv's UnsupportedArchitectureError message), or
    None. Checked on a meta-device model (shapes only, no memory, no weights); methods that
    choose their parameters from data are not checked here."""
    names = method_names(method)
    if any(needs_data(n) for n in names):
        return None
    with torch.device("meta"):
        model = build_model(model_name, 2, image_size, pretrained=False)
    try:
        pv.apply(model, method_configs(names, {}, None))
    except pv.UnsupportedArchitectureError as e:
        return str(e)
    except Exception:  # some methods cannot apply on meta tensors; the real run will tell
        return None
    return None
