"""Adapters in Hugging Face peft's layout (and diffusers' for a UNet LoRA), both ways.

peft:      adapter_config.json {"peft_type": "LORA" | "LOHA" | "LOKR" | "IA3" | "OFT", ...} +
           adapter_model.safetensors with "base_model.model.<module>.<peft tensor>" keys and the
           trained head as "base_model.model.<head>.<param>" (modules_to_save).
diffusers: pytorch_lora_weights.safetensors with "unet.<module>.lora_A.weight" keys and the
           LoRA config as JSON in the file's metadata ("lora_adapter_metadata"); plain LoRA only.
Each peft type has a codec (peft_lora, peft_lycoris, peft_ia3, peft_oft) that converts exactly
or refuses with the reason: a peft option peftvision cannot reproduce is never dropped silently.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from ..errors import AdapterLoadError, ConfigError
from ..layers import Adapter
from ..named import adapter_modules
from ..state import iter_parameters, require_state

PEFT_PREFIX = "base_model.model."
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class PeftCodec:
    """How one peft adapter type maps onto peftvision methods."""

    peft_type: str
    methods: tuple[str, ...]  # the peftvision method names saved as this type
    layers: tuple[type, ...]  # their adapter layer classes
    suffixes: tuple[str, ...]  # peft's tensor names under an adapted module ("lora_A.weight")
    # save: (method config, {module name: layer}) -> (peft config fields, {"<module>.<suffix>": tensor})
    to_peft: Callable[..., tuple[dict, dict[str, Tensor]]]
    # load: (peft config, {module: {suffix: tensor}}, source) -> (method entry, {our name: tensor})
    from_peft: Callable[..., tuple[dict, dict[str, Tensor]]]
    # peft options that have no peftvision equivalent: refused when set (truthy)
    refused: dict[str, str] = field(default_factory=dict)
    # peft options that act in training only: loading keeps the outputs, training differs
    training_only: tuple[str, ...] = ()
    # (module name, module) -> why peft computes something else on it, or ""
    layer_problem: Callable[[str, nn.Module], str] | None = None


def codecs() -> dict[str, PeftCodec]:
    """peft_type -> codec (imported here: the codec files import this one)."""
    from . import peft_ia3, peft_lora, peft_lycoris, peft_oft

    found = [peft_lora.CODEC, peft_lycoris.LOHA, peft_lycoris.LOKR, peft_ia3.CODEC, peft_oft.CODEC]
    return {c.peft_type: c for c in found}


# -- save -----------------------------------------------------------------------------------------

def peft_files(model: nn.Module) -> tuple[dict, dict[str, Tensor], dict[str, Tensor] | None]:
    """(peft adapter_config, peft tensors, diffusers tensors or None) for a model with one method
    that peft holds (LoRA with DoRA / rsLoRA, LoHa, LoKr, IA3, OFT) and its trained head."""
    state = require_state(model, "save_adapter(format='peft')")
    names = [m.name for m in state.methods]
    by_method = {name: c for c in codecs().values() for name in c.methods}
    if len(names) != 1 or names[0] not in by_method:
        raise ConfigError(f"format='peft' holds one of the methods {sorted(by_method)}, this model has "
                          f"{names}; save it in peftvision's format instead")
    method, codec = state.methods[0], by_method[names[0]]
    layers = {}
    for name, module in adapter_modules(model):  # canonical names: other adapters looked through
        if isinstance(module, Adapter) and module.adapter_name == state.adapter_name:
            if not isinstance(module, codec.layers):
                raise ConfigError(f"format='peft' cannot hold {name}: a {type(module).__name__} "
                                  f"({module.method_name}); save it in peftvision's format instead")
            problem = codec.layer_problem(name, module.weighted_layer) if codec.layer_problem else ""
            if problem:
                raise ConfigError(f"format='peft': {name}: {problem}; save it in peftvision's "
                                  "format instead")
            layers[name] = module
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        warnings.warn("peft's format cannot carry BatchNorm running statistics; a model trained in "
                      "train mode will differ after loading. Use peftvision's format to keep them.",
                      stacklevel=4)
    fields, adapter = codec.to_peft(method, layers)
    tensors = {PEFT_PREFIX + k: v for k, v in adapter.items()}
    params = {e.canonical: e.param for e in iter_parameters(model)}
    for canonical in state.head:
        tensors[PEFT_PREFIX + canonical] = params[canonical].detach()
    heads = sorted({c.rpartition(".")[0] for c in state.head})
    config = {"peft_type": codec.peft_type, "target_modules": sorted(layers),
              "modules_to_save": heads or None, "task_type": None, "inference_mode": True,
              "base_model_name_or_path": state.base_identity.get("name"), **fields}
    diffusers = None
    if state.architecture == "unet" and codec.peft_type == "LORA" and not config["use_dora"]:
        diffusers = {f"unet.{k.removeprefix(PEFT_PREFIX)}": v for k, v in tensors.items()}
    return config, tensors, diffusers


def diffusers_metadata(config: dict) -> dict[str, str]:
    return {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()})}


# -- load -----------------------------------------------------------------------------------------

def from_peft(config: dict, tensors: dict[str, Tensor], source: Path) -> tuple[dict, dict[str, Tensor]]:
    """A peft adapter -> (peftvision config, tensors named as in the adapted model)."""
    kind = config.get("peft_type")
    known = codecs()
    if kind not in known:
        raise AdapterLoadError(f"{source} is a peft {kind} adapter; peftvision reads peft "
                               f"{', '.join(known)} adapters")
    codec = known[kind]
    refused = [f"{k}={config[k]!r} ({why})" for k, why in codec.refused.items() if config.get(k)]
    if refused:
        raise AdapterLoadError(f"{source}: peft {kind} options peftvision cannot reproduce: "
                               f"{'; '.join(refused)}")
    dropped = [k for k in codec.training_only if config.get(k)]
    if dropped:
        warnings.warn(f"{source}: peftvision's {kind.lower()} has no {', '.join(dropped)}; outputs "
                      "are the same, but training from this adapter will not drop out", stacklevel=4)
    grouped: dict[str, dict[str, Tensor]] = {}
    renamed: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in codec.suffixes if name.endswith("." + s)), None)
        if suffix is None:  # the trained head (modules_to_save), checked against the model later
            renamed[name] = tensor
        else:
            grouped.setdefault(name[: -len(suffix) - 1], {})[suffix] = tensor
    if not grouped:
        raise AdapterLoadError(f"{source} holds no {kind} weights")
    method, adapter = codec.from_peft(config, grouped, source)
    ours = {"methods": [method], "base_model": {}, "train_head": bool(config.get("modules_to_save")),
            "from_peft": True, "peft_type": kind}
    return ours, {**renamed, **adapter}


def check_peft_targets(model: nn.Module, config: dict) -> None:
    """AdapterLoadError when a peft adapter targets a layer on which peft computes a function
    peftvision's method does not (see each codec's `layer_problem`); nothing changed yet."""
    codec = codecs().get(config.get("peft_type"))
    if codec is None or codec.layer_problem is None:
        return
    for target in config["methods"][0]["config"].get("targets") or ():
        try:
            module = model.get_submodule(target)
        except AttributeError:
            continue  # the shape check names missing modules
        problem = codec.layer_problem(target, module)
        if problem:
            raise AdapterLoadError(f"cannot load this peft {codec.peft_type} adapter: {target}: {problem}")


def module_names(grouped: dict[str, dict[str, Tensor]], source: Path, needed: tuple[str, ...]) -> list[str]:
    """The adapted modules, each checked to hold every tensor in `needed`."""
    for module, parts in grouped.items():
        missing = [s for s in needed if s not in parts]
        if missing:
            raise AdapterLoadError(f"{source}: {module} lacks {', '.join(missing)}; the file is "
                                   "incomplete, re-save it with peft")
    return sorted(grouped)
