"""LoRA adapters in Hugging Face peft's layout (and diffusers' for UNets), both ways.

peft:      adapter_config.json {"peft_type": "LORA", r, lora_alpha, target_modules, ...} +
           adapter_model.safetensors with "base_model.model.<module>.lora_A.weight" keys and the
           trained head as "base_model.model.<head>.<param>" (modules_to_save).
diffusers: pytorch_lora_weights.safetensors with "unet.<module>.lora_A.weight" keys and the
           LoRA config as JSON in the file's metadata ("lora_adapter_metadata").
Only plain LoRA (Linear, ungrouped undilated Conv) and the head translate; anything else is
refused with the reason.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from torch import Tensor, nn

from ..errors import AdapterLoadError, ConfigError
from ..layers import Adapter
from ..state import iter_parameters, require_state
from .lora import LoRAConv, LoRALinear

PEFT_PREFIX = "base_model.model."
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def _lora_layers(model: nn.Module) -> dict[str, Adapter]:
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, Adapter) and not isinstance(module, (LoRALinear, LoRAConv)):
            raise ConfigError(f"format='peft' holds only LoRA; {name} is {type(module).__name__} "
                              f"({module.method_name}); save it in peftvision's format instead")
        if isinstance(module, LoRAConv):
            conv = module.weighted_layer
            if conv.groups != 1 or any(d != 1 for d in conv.dilation):
                raise ConfigError(f"format='peft': {name} is a grouped or dilated conv, which peft's "
                                  "LoRA cannot express")
        if isinstance(module, (LoRALinear, LoRAConv)):
            layers[name] = module
    return layers


def peft_files(model: nn.Module) -> tuple[dict, dict[str, Tensor], dict[str, Tensor] | None]:
    """(peft adapter_config, peft tensors, diffusers tensors or None) for a LoRA-only model."""
    state = require_state(model, "save_adapter(format='peft')")
    methods = [m for m in state.methods]
    if [m.name for m in methods] != ["lora"]:
        raise ConfigError(f"format='peft' holds only LoRA, this model has {[m.name for m in methods]}")
    lora = methods[0]
    layers = _lora_layers(model)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        warnings.warn("peft's format cannot carry BatchNorm running statistics; a model trained in "
                      "train mode will differ after loading. Use peftvision's format to keep them.",
                      stacklevel=3)
    names = {e.canonical: e for e in iter_parameters(model)}
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        # peft stores lora_A/lora_B as the weights of small Linear/Conv modules: same shapes as ours
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
    heads = sorted({c.rpartition(".")[0] for c in state.head})
    for canonical in state.head:
        tensors[PEFT_PREFIX + canonical] = names[canonical].param.detach()
    config = {
        "peft_type": "LORA", "r": lora.r, "lora_alpha": lora.alpha if lora.alpha is not None else lora.r,
        "lora_dropout": lora.dropout, "target_modules": sorted(layers), "bias": "none",
        "modules_to_save": heads or None, "fan_in_fan_out": False, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "task_type": None, "rank_pattern": {},
        "alpha_pattern": {}, "inference_mode": True,
        "base_model_name_or_path": state.base_identity.get("name"),
    }
    diffusers = None
    if state.architecture == "unet":
        diffusers = {f"unet.{k.removeprefix(PEFT_PREFIX)}": v for k, v in tensors.items()}
    return config, tensors, diffusers


def diffusers_metadata(config: dict) -> dict[str, str]:
    return {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()})}


def from_peft(config: dict, tensors: dict[str, Tensor], source: Path) -> tuple[dict, dict[str, Tensor]]:
    """A peft LoRA adapter -> (peftvision config, tensors named as in the adapted model)."""
    if config.get("peft_type") != "LORA":
        raise AdapterLoadError(f"{source} is a peft {config.get('peft_type')} adapter; "
                               "peftvision reads peft LoRA adapters only")
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                               "layers_to_transform", "fan_in_fan_out") if config.get(k)]
    if unsupported or config.get("bias", "none") != "none":
        raise AdapterLoadError(f"{source}: peft LoRA options {unsupported or ['bias']} have no "
                               "peftvision equivalent")
    renamed: dict[str, Tensor] = {}
    targets = set()
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                targets.add(module)
                name = f"{module}.{part}"
        renamed[name] = tensor
    if not targets:
        raise AdapterLoadError(f"{source} holds no LoRA weights")
    # LoRALinear keeps A as (r, in); LoRAConv as (r, in, k, k): both as peft stores them
    lora = {"r": int(config["r"]), "alpha": float(config.get("lora_alpha", config["r"])),
            "dropout": float(config.get("lora_dropout", 0.0)), "targets": sorted(targets),
            "qkv_parts": None}
    ours = {"methods": [{"name": "lora", "config": lora}], "base_model": {},
            "train_head": bool(config.get("modules_to_save")), "from_peft": True}
    return ours, renamed
