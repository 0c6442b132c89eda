"""set_scale: a per-adapter output scale at inference (peft's `set_scale`, defined per kind).

A scale s multiplies what the adapter's layers change, ΔW·s in weight terms, so s = 0 gives the
output without them and s = 1 the adapter as trained:
- LoRA (rsLoRA, qkv slices, convs, PiSSA / OLoRA's offset), LoHa, LoKr: s multiplies the
  layer's own scaling (alpha/r, or alpha/√r with rsLoRA, which peft's set_scale misses:
  huggingface/peft#2733), so ΔW becomes s·ΔW in the forward and in merge;
- DoRA: W + s·(W' - W) with W' = m·(W+ΔW)/‖W+ΔW‖ (the forward adds s times its effect);
- IA3: the vector l becomes 1 + s·(l - 1), which is W + s·(W·diag(l) - W).
Other kinds are refused: a prompt (VPT) or a re-run block (AdaptFormer) has no ΔW, and
methods that train the model's own parameters (bias, norms, heads) are not scaled. The head an
adapter trains stays as trained: at s = 0 the model computes the base backbone with the
adapter's head (the base output when the adapter has no head of its own). The scale is an
inference setting: save_adapter does not store it, and it cannot change while merged.
"""

from __future__ import annotations

import math

from torch import nn

from .errors import ConfigError, MergeError
from .layers import AdapterLayer
from .methods.dora import DoRAMixin
from .methods.ia3 import IA3Layer
from .methods.loha import LoHaLayer
from .methods.lokr import LoKrLayer
from .methods.lora import LoRALayer
from .named import _require
from .wrappers import unwrap

SCALED = "LoRA (rsLoRA, PiSSA / OLoRA, qkv slices), DoRA, LoHa, LoKr and IA3"


def set_scale(model: nn.Module, adapter_name: str, scale: float) -> nn.Module:
    """Scale adapter `adapter_name`'s effect by `scale` (0: off, 1: as trained; any finite
    number, negative reverses it) on the layers it has now. Applies to the unmerged forward and
    to merge; not saved with the adapter. See the module docstring for each method's meaning."""
    wrapper, model = model, unwrap(model)
    found = _require(model, "set_scale")
    if adapter_name not in found.states:
        raise ConfigError(f"set_scale: no adapter named {adapter_name!r}; adapters: {list(found.states)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ConfigError(f"set_scale: scale must be a finite number (0 turns the adapter off, 1 is "
                          f"as trained), got {scale!r}")
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and m.adapter_name == adapter_name]
    state = found.states[adapter_name]
    selective = [m.name for m in state.methods if m.kind == "selective"]
    if selective:
        raise ConfigError(f"set_scale: adapter {adapter_name!r} has {selective}, which train the model's "
                          f"own parameters; set_scale scales adapter layers only ({SCALED})")
    unscalable = sorted({m.method_name or type(m).__name__ for m in layers if not _scalable(m)})
    if unscalable:
        raise ConfigError(f"set_scale: adapter {adapter_name!r} has {unscalable}, which have no output "
                          f"scale: set_scale scales a weight change ΔW, defined for {SCALED}")
    if not layers:
        raise ConfigError(f"set_scale: adapter {adapter_name!r} has no layers to scale")
    if any(m.merged for m in layers):
        raise MergeError(f"set_scale: adapter {adapter_name!r} is merged into the weights; call "
                         "peftvision.unmerge(model) first, then merge again after set_scale")
    for layer in layers:
        _set(layer, float(scale))
    return wrapper


def get_scale(model: nn.Module, adapter_name: str) -> float:
    """The scale set_scale gave adapter `adapter_name` (1.0 when never set)."""
    model = unwrap(model)
    found = _require(model, "get_scale")
    if adapter_name not in found.states:
        raise ConfigError(f"get_scale: no adapter named {adapter_name!r}; adapters: {list(found.states)}")
    return next((getattr(m, "effect_scale", 1.0) for m in model.modules()
                 if isinstance(m, AdapterLayer) and m.adapter_name == adapter_name), 1.0)


def _scalable(layer: AdapterLayer) -> bool:
    return isinstance(layer, (LoRALayer, LoHaLayer, LoKrLayer, IA3Layer))


def _set(layer: AdapterLayer, scale: float) -> None:
    if isinstance(layer, (DoRAMixin, IA3Layer)):  # their forward and merge read effect_scale
        layer.effect_scale = scale
        return
    # LoRA, LoHa, LoKr: every use of ΔW goes through `scaling` (forward, delta_weight, merge)
    unit = layer.__dict__.setdefault("_unit_scaling", layer.scaling)
    layer.scaling = unit * scale
    layer.effect_scale = scale
