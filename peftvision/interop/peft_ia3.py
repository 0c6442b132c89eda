"""peft IA3 <-> peftvision IA3.

peft keeps one ia3_l per module: (out, 1) scaling a Linear's output, (1, in) its input (a
"feedforward" module), (1, C, 1, 1) a conv's. Our IA3 scales only the k and v thirds of a fused
qkv; peft has no partial scale, so saving writes ones over the q third (the same function) and
loading gives fused_qkv=False (whole-output scales, as peft trained them).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ..methods.ia3 import IA3, IA3Layer
from .peft import PeftCodec, module_names


def layer_problem(name: str, module: nn.Module) -> str:
    if not isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
        return f"a {type(module).__name__}; peft's IA3 takes Linear, Conv2d and Conv3d only"
    return ""


def _peft_shape(scale: Tensor, layer: nn.Module, on_input: bool) -> Tensor:
    if isinstance(layer, nn.Linear):
        return scale.reshape(1, -1) if on_input else scale.reshape(-1, 1)  # (1, in) / (out, 1)
    return scale.reshape(1, -1, *([1] * (layer.weight.dim() - 2)))  # (1, C, 1, ...)


def to_peft(method: IA3, layers: dict[str, IA3Layer]) -> tuple[dict, dict[str, Tensor]]:
    tensors = {}
    for name, layer in layers.items():
        scale = layer.ia3_scale.detach()
        if layer.start:  # ones over the channels it leaves alone (a fused qkv's q third)
            scale = torch.cat([scale.new_ones(layer.start), scale])
        tensors[f"{name}.ia3_l"] = _peft_shape(scale, layer.weighted_layer, layer.on_input)
    inputs = sorted(name for name, layer in layers.items() if layer.on_input)
    return {"feedforward_modules": inputs, "fan_in_fan_out": False, "init_ia3_weights": True}, tensors


def _is_feedforward(name: str, feedforward: str | list[str] | None) -> bool:
    """peft's rule: a regex matching the whole name, or a list of name endings."""
    if not feedforward:
        return False
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(f) for f in feedforward)


def from_peft(config: dict, grouped: dict[str, dict[str, Tensor]], source: Path) -> tuple[dict, dict]:
    modules = module_names(grouped, source, ("ia3_l",))
    feedforward = config.get("feedforward_modules")
    inputs = [m for m in modules if _is_feedforward(m, feedforward)]
    outputs = [m for m in modules if m not in inputs]
    tensors = {f"{m}.ia3_scale": grouped[m]["ia3_l"].flatten() for m in modules}  # (C,)
    ia3 = {"targets": outputs or None, "input_targets": inputs or None, "fused_qkv": False}
    return {"name": "ia3", "config": ia3}, tensors


CODEC = PeftCodec(
    peft_type="IA3", methods=("ia3",), layers=(IA3Layer,), suffixes=("ia3_l",),
    to_peft=to_peft, from_peft=from_peft, layer_problem=layer_problem,
    refused={"fan_in_fan_out": "transposed (GPT-2 Conv1D) weights do not occur in vision models"},
)
