"""Checks before a layer is wrapped: what would otherwise crash later or be silently ignored.

A layer with integer / quantized weights (only bitsandbytes layers, for methods that can run on
them), and a parent that reads attributes of the wrapped child itself (EVA's qkv.weight,
MaxViT's rel_pos.get_bias()), which no wrapper can give adapted.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import TYPE_CHECKING

from torch import nn

from .. import quant
from ..errors import UnsupportedArchitectureError
from ..layers import AdapterLayer

if TYPE_CHECKING:
    from .base import Method


def unwrapped(module: nn.Module) -> nn.Module:
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


def check_float_weights(method: Method, name: str, module: nn.Module) -> None:
    """Refuse to wrap a layer with integer / quantized weights unless it is a bitsandbytes layer
    and the method can run on it (QLoRA): never a raw torch error later on an int8 tensor."""
    layer = unwrapped(module)
    if not quant.is_quantized(layer):
        return
    why = method.quantized_refusal() if quant.bnb_kind(layer) else "integer or quantized weights"
    if why:
        raise UnsupportedArchitectureError(quant.refusal(method.name, name, layer, why))


_PARENT_READS = re.compile(r"self\.(\w+)\.(\w+)")


@functools.cache
def attributes_read(cls: type) -> dict[str, frozenset[str]]:
    """child name -> attributes of it that `cls`'s forward code reads (self.child.attr); only
    timm and diffusers classes are read (their source is plain Python we know the layout of)."""
    reads: dict[str, set[str]] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.split(".")[0] not in ("timm", "diffusers"):
            continue
        for fname, fn in vars(klass).items():  # what runs per call, not init or set-up code
            if not (inspect.isfunction(fn) and any(k in fname for k in ("forward", "attn", "pos_embed"))):
                continue
            try:
                source = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            for child, attr in _PARENT_READS.findall(source):
                reads.setdefault(child, set()).add(attr)
    return {k: frozenset(v) for k, v in reads.items()}


def check_parent_access(method: Method, name: str, parent: nn.Module, child: str, layer: AdapterLayer) -> None:
    """Refuse a wrapper whose parent reads attributes of the wrapped child that the wrapper cannot
    give correctly (EVA reads qkv.weight: an additive ΔW gives W + ΔW; MaxViT calls
    rel_pos.get_bias(), which no wrapper can adapt): never a crash or a silently ignored adapter."""
    read = attributes_read(type(parent)).get(child, ())
    if "weight" in read and quant.is_quantized(layer.weighted_layer):  # F.linear(x, uint8 weight)
        raise UnsupportedArchitectureError(
            f"{method.name} cannot adapt {name}: its parent {type(parent).__name__} computes with "
            f"{child}.weight itself, which is {quant.describe(layer.weighted_layer)}. Keep {name} "
            "in float (peftvision.quant.quantize leaves such layers out), or leave it out of targets")
    missing = sorted(a for a in read
                     if a != "forward" and not hasattr(type(layer), a)
                     and a not in layer._parameters and a not in layer._buffers and a not in layer._modules)
    if missing:
        reads = ", ".join(f"{child}.{a}" for a in missing)
        raise UnsupportedArchitectureError(
            f"{method.name} cannot adapt {name}: its parent {type(parent).__name__} reads {reads} "
            f"directly, which a {type(layer).__name__} cannot provide adapted. Leave {name} out of targets")
