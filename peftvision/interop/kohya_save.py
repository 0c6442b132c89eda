"""save_adapter(format="kohya"): one .safetensors file in the kohya-ss / A1111 / LyCORIS layout.

Layout and maths as in interop/kohya.py. Per layer, alpha is written as scaling·rank so that
readers' alpha/rank is our scaling (rsLoRA included); a LoKr layer with no low-rank factor is
read with scale 1, so our scaling is folded into its W1 instead. PiSSA / OLoRA's frozen offset
is written as peft writes it, a plain LoRA of rank 2r. Refused with the reason: other methods,
DoRA (readers drop or redefine its magnitude), LoRA on chosen qkv slices, grouped convs.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import Adapter
from ..methods.dora import DoRAMixin
from ..methods.loha import LoHaLayer
from ..methods.lokr import LoKrLayer
from ..methods.lora import LoRAConv, LoRALinear
from ..state import require_state
from .peft_lora import _factors
from .peft_lycoris import LOHA_FACTORS, LOKR_FACTORS

# which file prefix each model's layers get
PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
WRITABLE = ("lora", "loha", "lokr")


def _refuse(name: str, why: str) -> ConfigError:
    return ConfigError(f"format='kohya' cannot hold {name}: {why}; save it in peftvision's format instead")


def _lora(name: str, layer: nn.Module) -> dict[str, Tensor]:
    if isinstance(layer, DoRAMixin):
        raise _refuse(name, "a DoRA layer (diffusers drops kohya's dora_scale and LyCORIS defines "
                            "the magnitude per input channel)")
    if not isinstance(layer, (LoRALinear, LoRAConv)):
        raise _refuse(name, f"a {type(layer).__name__} (LoRA on chosen qkv slices)")
    if getattr(layer.weighted_layer, "groups", 1) != 1:
        raise _refuse(name, "a grouped conv, which a kohya LoCon down-projection cannot express")
    down, up = _factors(layer)  # (r', in[, k, k]), (out, r'[, 1, 1]); r' = 2r with an offset
    return {"lora_down.weight": down, "lora_up.weight": up,
            "alpha": _scalar(layer.scaling * down.shape[0], down)}


def _loha(name: str, layer: LoHaLayer) -> dict[str, Tensor]:
    out = {f: getattr(layer, f).detach() for f in LOHA_FACTORS}
    out["alpha"] = _scalar(layer.scaling * layer.r, out["hada_w1_a"])
    return out


def _lokr(name: str, layer: LoKrLayer) -> dict[str, Tensor]:
    out = {f: layer._parameters[f].detach() for f in LOKR_FACTORS if f in layer._parameters}
    first = "lokr_w1" if "lokr_w1" in out else "lokr_w1_a"
    if "lokr_w1_a" in out or "lokr_w2_a" in out:
        out["alpha"] = _scalar(layer.scaling * layer.r, out[first])
    else:  # readers apply no alpha to full factors (LyCORIS writes alpha = r): fold the scaling
        out[first] = out[first] * layer.scaling
        out["alpha"] = _scalar(float(layer.r), out[first])
    return out


def _scalar(value: float, like: Tensor) -> Tensor:
    import torch

    return torch.tensor(float(value), dtype=torch.float32, device=like.device)


def _text_model(model: nn.Module, target: str, name: str) -> str:
    """kohya names CLIP's layers from its text_model level, which transformers >= 5 leaves out."""
    if target == "unet" or hasattr(model, "text_model") or name.startswith("text_projection"):
        return ""
    return "text_model_"


def layer_tensors(model: nn.Module, target: str) -> tuple[dict[str, Tensor], list[str]]:
    """{file key: tensor} for one model whose only adapter is active, and its method names."""
    state = require_state(model, "save_adapter(format='kohya')")
    names = [m.name for m in state.methods]
    extra = [n for n in names if n not in WRITABLE]
    if extra or state.head or state.selected:
        what = extra or ["a trained head or base parameters"]
        raise ConfigError(f"format='kohya' holds the methods {WRITABLE} only (LoRA / LoCon, LoHa, "
                          f"LoKr), this {target} has {what}; save it in peftvision's format instead")
    tensors: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Adapter):
            continue
        if isinstance(module, LoHaLayer):
            found = _loha(name, module)
        elif isinstance(module, LoKrLayer):
            found = _lokr(name, module)
        else:
            found = _lora(name, module)
        key = PREFIX[target] + _text_model(model, target, name) + name.replace(".", "_")
        tensors.update({f"{key}.{k}": v.detach().cpu().contiguous() for k, v in found.items()})
    return tensors, names


def kohya_bytes(models: dict[str, nn.Module]) -> bytes:
    """The file's bytes for {"unet": unet, "text_encoder": ..., ...} (models already alone)."""
    from safetensors.torch import save

    from .. import __version__

    tensors: dict[str, Tensor] = {}
    kinds: set[str] = set()
    for target, model in models.items():
        found, names = layer_tensors(model, target)
        tensors.update(found)
        kinds.update(names)
    # kohya-ss' own metadata fields, for tools that show them (A1111's LoRA card); readers do
    # not need them: every layer carries its rank and alpha
    algo = sorted(kinds)
    metadata = {"format": "pt", "peftvision_version": __version__,
                "ss_network_module": "networks.lora" if algo == ["lora"] else "lycoris.kohya"}
    if algo != ["lora"]:
        metadata["ss_network_args"] = json.dumps({"algo": "+".join(algo)})
    return save(tensors, metadata=metadata)


def check_path(path: Path) -> None:
    if path.suffix != ".safetensors" or path.is_dir():
        raise ValueError(f"format='kohya' writes one file; give a path ending in .safetensors, got {path}")


def save_kohya(unet: nn.Module, path: Path, adapter_name: str, text_encoder: nn.Module | None,
               text_encoder_2: nn.Module | None) -> None:
    """save_adapter(format="kohya"): every model checked and converted, then one atomic write."""
    import contextlib

    from ..checkpoint import _alone
    from ..folder import replace_file
    from ..state import get_adapters
    from ..wrappers import unwrap

    check_path(path)
    if get_state_architecture(unet) != "unet":
        raise ConfigError(f"format='kohya' is Stable Diffusion's UNet layout; this model is a "
                          f"{get_state_architecture(unet)} model. Use format='peft' or 'peftvision'")
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    models = {k: unwrap(m) for k, m in models.items() if m is not None}
    with contextlib.ExitStack() as stack:
        for target, model in models.items():
            found = get_adapters(model)
            if found is None:
                raise ConfigError(f"save_adapter(format='kohya'): the {target} has no peftvision adapter")
            name = adapter_name if adapter_name in found.states else None
            if name is None and target != "unet":  # a text encoder's own single adapter
                name = require_state(model, "save_adapter").adapter_name
            stack.enter_context(_alone(model, name or adapter_name))
        data = kohya_bytes(models)
    replace_file(path, data)


def get_state_architecture(model: nn.Module) -> str:
    return require_state(model, "save_adapter(format='kohya')").architecture
