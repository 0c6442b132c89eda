"""Where the vision adapters go: the transformer blocks of the model families they support.

One small finder per family (a block-name regex and the block class), kept apart from the methods
so that it moves as a unit into an architecture registry.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError, UnsupportedArchitectureError
from ..layers import AdapterLayer
from ..surgery import get_module
from ..targets import VIT, _loaded_class
from .base import ApplyContext, Method

SWIN = "swin"

# family -> [(model class, block class, block-name regex)]; classes looked up only if timm is loaded
FAMILIES: dict[str, list[tuple[tuple[str, str], tuple[str, str], str]]] = {
    VIT: [(("timm.models.vision_transformer", "VisionTransformer"),
           ("timm.models.vision_transformer", "Block"), r"blocks\.\d+")],
    SWIN: [(("timm.models.swin_transformer", "SwinTransformer"),
            ("timm.models.swin_transformer", "SwinTransformerBlock"), r"layers\.\d+\.blocks\.\d+"),
           (("timm.models.swin_transformer_v2", "SwinTransformerV2"),
            ("timm.models.swin_transformer_v2", "SwinTransformerV2Block"), r"layers\.\d+\.blocks\.\d+")],
}
DESCRIBED = {VIT: "timm VisionTransformer", SWIN: "timm SwinTransformer (v1, v2)"}


def _match(model: nn.Module, families: Sequence[str]):
    """(family, block class, block regex) of the first of `families` `model` belongs to, or None."""
    for family in families:
        for model_spec, block_spec, pattern in FAMILIES[family]:
            cls = _loaded_class(*model_spec)
            if cls is not None and isinstance(model, cls):
                return family, _loaded_class(*block_spec), pattern
    return None


def model_family(model: nn.Module, families: Sequence[str]) -> str | None:
    """The first of `families` whose model class `model` is an instance of, else None."""
    found = _match(model, families)
    return found[0] if found else None


def transformer_blocks(ctx: ApplyContext, method: Method, families: Sequence[str]
                       ) -> tuple[str, list[tuple[str, nn.Module]]]:
    """(family, [(canonical block name, block)]) of the model, or UnsupportedArchitectureError
    naming the families `method` supports."""
    found = _match(ctx.model, families)
    if found is None:
        supported = ", ".join(f"{DESCRIBED[f]} ({f!r})" for f in families)
        raise UnsupportedArchitectureError(
            f"method {method.name!r} does not support {type(ctx.model).__name__}; it supports: "
            f"{supported}")
    family, block_cls, pattern = found
    return family, ctx.find(method, pattern, allowed=(block_cls,))


def refuse_second_block_runner(ctx: ApplyContext, method: Method, name: str) -> None:
    """A wrapper that re-runs a block's own steps (`runs_block`: AdaptFormer, Convpass) calls the
    user's block directly, so a second such wrapper on the same block would be skipped silently.
    Another named adapter's may: set_adapter refuses activating the two together."""
    module = get_module(ctx.model, name)
    while isinstance(module, AdapterLayer):
        if getattr(module, "runs_block", False) and module.adapter_name == ctx.state.adapter_name:
            raise ConfigError(f"{method.name} cannot be combined with {module.method_name} on "
                              f"{name}: both re-run the block's steps, so one would be skipped; "
                              "apply only one of them")
        module = module.base_layer
