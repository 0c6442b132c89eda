"""peft LoRA <-> peftvision LoRA, with DoRA and rsLoRA.

Same tensors: lora_A (r, in[, k, k]) and lora_B (out, r[, 1, 1]) are the weights of peft's
lora_A / lora_B modules; scaling alpha/r, or alpha/sqrt(r) with use_rslora, on both sides. DoRA's
magnitude is our (out,) vector; peft keeps it as (out,) for a Linear and (1, out, 1, 1) for a conv.
PiSSA / OLoRA save as what peft's own conversion writes: the trained and the frozen initial
factors stacked into one plain LoRA of rank 2r, s·(B·A - B0·A0) = s·[B, -B0]·[A; A0], with
alpha chosen so the scaling stays s.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import AdapterLoadError
from ..methods.dora import DoRAMixin
from ..methods.lora import LoRA, LoRAConv, LoRALayer, LoRALinear
from .peft import PeftCodec, module_names

# peft's LoRA initialisations that rewrite the base weights: the factors are relative to a base
# model peftvision does not have
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _factors(layer: LoRALayer) -> tuple[Tensor, Tensor]:
    """(A, B) as peft stores them; with PiSSA / OLoRA's offset, the rank-2r stack."""
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    if layer.has_offset:
        a = torch.cat([a, layer.lora_A0.to(a.dtype)])  # (2r, in[, k, k])
        b = torch.cat([b, -layer.lora_B0.to(b.dtype)], dim=1)  # (out, 2r[, 1, 1])
    return a, b


def to_peft(method: LoRA, layers: dict[str, LoRALayer]) -> tuple[dict, dict[str, Tensor]]:
    offset = any(layer.has_offset for layer in layers.values())
    alpha = float(method.alpha if method.alpha is not None else method.r)
    r = 2 * method.r if offset else method.r
    if offset:  # the same scaling at twice the rank
        alpha = alpha * (math.sqrt(2) if method.use_rslora else 2)
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = _factors(layer)
        if isinstance(layer, DoRAMixin):
            m = layer.lora_magnitude.detach()
            if isinstance(layer, LoRAConv):  # (1, out, 1, ...): peft's conv layout
                m = m.reshape(1, -1, *([1] * (layer.lora_A.dim() - 2)))
            tensors[f"{name}.lora_magnitude_vector"] = m
    fields = {"r": r, "lora_alpha": alpha, "lora_dropout": method.dropout, "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": method.use_rslora,
              "use_dora": method.use_dora, "rank_pattern": {}, "alpha_pattern": {}}
    return fields, tensors


def layer_problem(name: str, module: nn.Module) -> str:
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1 or any(d != 1 for d in module.dilation):
            return "a grouped or dilated conv, which peft's LoRA cannot express"
    return ""


def from_peft(config: dict, grouped: dict[str, dict[str, Tensor]], source: Path) -> tuple[dict, dict]:
    if config.get("bias", "none") != "none":
        raise AdapterLoadError(f"{source}: peft LoRA bias={config['bias']!r} trains the base biases, "
                               "which a peft LoRA file does not tie to a peftvision method")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterLoadError(
            f"{source}: init_lora_weights={init!r} changed the base weights when the adapter was "
            "made, so its factors only fit that changed base. Save it from peft with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain LoRA")
    use_dora = bool(config.get("use_dora"))
    needed = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if use_dora else ())
    modules = module_names(grouped, source, needed)
    tensors: dict[str, Tensor] = {}
    for module in modules:
        parts = grouped[module]
        if "lora_magnitude_vector" in parts and not use_dora:
            raise AdapterLoadError(f"{source}: {module} holds a DoRA magnitude but the config says "
                                   "use_dora=false; the file and config disagree, re-save with peft")
        tensors[f"{module}.lora_A"] = parts["lora_A.weight"]
        tensors[f"{module}.lora_B"] = parts["lora_B.weight"]
        if use_dora:
            tensors[f"{module}.lora_magnitude"] = parts["lora_magnitude_vector"].flatten()  # (out,)
    r = int(config["r"])
    lora = {"r": r, "alpha": float(config.get("lora_alpha", r)),
            "dropout": float(config.get("lora_dropout", 0.0)), "targets": modules,
            "qkv_parts": None, "use_rslora": bool(config.get("use_rslora", False)), "use_dora": use_dora}
    return {"name": "lora", "config": lora}, tensors


_NOT_PEFTVISION = "not a peftvision LoRA option"
CODEC = PeftCodec(
    peft_type="LORA", methods=("lora", "dora"), layers=(LoRALinear, LoRAConv),
    suffixes=("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    to_peft=to_peft, from_peft=from_peft, layer_problem=layer_problem,
    refused={"rank_pattern": "peftvision's LoRA has one rank for every layer",
             "alpha_pattern": "peftvision's LoRA has one alpha for every layer",
             "fan_in_fan_out": "transposed (GPT-2 Conv1D) weights do not occur in vision models",
             "lora_bias": "peftvision's LoRA trains no bias on lora_B",
             "use_qalora": _NOT_PEFTVISION, "target_parameters": _NOT_PEFTVISION,
             "trainable_token_indices": _NOT_PEFTVISION, "layer_replication": _NOT_PEFTVISION,
             "alora_invocation_tokens": _NOT_PEFTVISION, "use_bdlora": _NOT_PEFTVISION},
)
