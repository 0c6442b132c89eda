"""Stable Diffusion community single-file adapters (kohya-ss sd-scripts, A1111, LyCORIS) -> peftvision.

One .safetensors file; each adapted layer is "<prefix><module path, '.' written '_'>.<tensor>":
  prefixes  lora_unet_ (the UNet), lora_te_ / lora_te1_ (the text encoder), lora_te2_ (SDXL's second)
  LoRA/LoCon lora_down.weight (r, in[, k, k]), lora_up.weight (out, r[, 1, 1]), alpha (a scalar);
            ΔW = (alpha/r)·up·down (a conv's down has the base conv's kernel, up is 1x1)
  LoHa      hada_w1_a (out, r), hada_w1_b (r, in·k·k), hada_w2_a, hada_w2_b, alpha;
            ΔW = (alpha/r)·(w1_a·w1_b) ⊙ (w2_a·w2_b)
  LoKr      lokr_w1 (a, c) or lokr_w1_a/b, lokr_w2 (b, d[, k, k]) or lokr_w2_a (b, r)/lokr_w2_b (r, d·k·k),
            alpha; ΔW = s·W1 ⊗ W2 with s = alpha/r when a factor is low rank, else 1 (LyCORIS stores
            alpha = r then; A1111 and diffusers ignore it)
SDXL files use the original UNet's block names (kohya_sgm.py maps them). A missing alpha means
alpha = r. Every layer has its own rank and alpha; a peftvision method has one of each, so
smaller ranks are zero-padded to the largest (ΔW unchanged, exactly) and a layer whose alpha/r
differs from the common one has the ratio folded into one factor (ΔW equal up to one fp32
rounding). Conversion to peftvision's layout is in this file; writing is in kohya_save.py.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import AdapterLoadError, CorruptAdapterError
from ..methods.lokr import factorization
from ..registry import get_method
from .kohya_sgm import SGM_NAMES, TOP, to_diffusers
from .peft_lycoris import LOHA_FACTORS, LOKR_FACTORS

# file prefix -> the model it adapts ("unet", "text_encoder", "text_encoder_2")
PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
            "lora_te2_": "text_encoder_2"}
LORA_FACTORS = ("lora_down.weight", "lora_up.weight")
KINDS = {"lora": LORA_FACTORS, "loha": LOHA_FACTORS, "lokr": LOKR_FACTORS}
# tensors of LyCORIS / kohya variants peftvision has no method for: refused with the reason
REFUSED = {
    "hada_t1": "LoHa's Tucker conv core (use_tucker)", "hada_t2": "LoHa's Tucker conv core (use_tucker)",
    "lokr_t1": "LoKr's Tucker conv core (use_tucker)", "lokr_t2": "LoKr's Tucker conv core (use_tucker)",
    "lora_mid.weight": "LoCon's Tucker conv core (use_tucker / use_cp)",
    "dora_scale": "DoRA (weight decomposition), whose magnitude LyCORIS and kohya define per input "
                  "channel, unlike peftvision's per output",
    "diff": "a full weight difference (LyCORIS 'full' / 'lokr' full matrix as diff)",
    "diff_b": "a full bias difference", "w_norm": "a norm-layer adapter", "b_norm": "a norm-layer adapter",
    "oft_blocks": "LyCORIS OFT / BOFT", "oft_diag": "LyCORIS OFT", "rescale": "LyCORIS OFT",
    "on_input": "IA3", "weight": "IA3 or a full weight",
}


@dataclass
class FileLayer:
    """One adapted layer of the file: its kind, factors and alpha (None: alpha = rank)."""

    key: str  # the file's layer name, prefix included
    kind: str = ""
    factors: dict[str, Tensor] = field(default_factory=dict)
    alpha: float | None = None


@dataclass
class Part:
    """What one model (UNet or a text encoder) receives: peftvision config and tensors."""

    target: str  # "unet", "text_encoder", "text_encoder_2"
    config: dict
    tensors: dict[str, Tensor]


def is_single_file(source: object) -> bool:
    return isinstance(source, (str, os.PathLike)) and Path(source).expanduser().is_file()


def read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise AdapterLoadError(f"{path} is a file; load_adapter reads a folder written by save_adapter, "
                               "a Hub repo id, or a single .safetensors kohya / A1111 / LyCORIS file")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptAdapterError(f"{path} is truncated or corrupt ({exc}); re-download it") from exc


def parse_layers(tensors: dict[str, Tensor], source: Path) -> dict[str, FileLayer]:
    """Group the file's tensors by layer, every key and tensor checked; nothing is applied."""
    layers: dict[str, FileLayer] = {}
    unknown, refused = [], []
    suffixes = {s: kind for kind, names in KINDS.items() for s in names}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        if not name.startswith(tuple(PREFIXES)):
            unknown.append(key)
            continue
        layer = layers.setdefault(name, FileLayer(name))
        if suffix == "alpha":
            if tensor.numel() != 1 or tensor.dtype == torch.bool or tensor.is_complex():
                raise CorruptAdapterError(f"{source}: {key} must be one number, got shape {tuple(tensor.shape)}")
            layer.alpha = float(tensor.reshape(()).float())
            if not math.isfinite(layer.alpha) or layer.alpha <= 0:
                raise CorruptAdapterError(f"{source}: {key} = {layer.alpha}; alpha must be a positive number")
        elif suffix in suffixes:
            if not tensor.is_floating_point():
                raise CorruptAdapterError(f"{source}: {key} holds {tensor.dtype}; factors are floating point")
            if layer.kind and layer.kind != suffixes[suffix]:
                raise CorruptAdapterError(f"{source}: {name} mixes {layer.kind} and {suffixes[suffix]} tensors")
            layer.kind = suffixes[suffix]
            layer.factors[suffix] = tensor
        elif suffix in REFUSED:
            refused.append(f"{key} ({REFUSED[suffix]})")
        else:
            unknown.append(key)
    if unknown:
        raise AdapterLoadError(
            f"{source} is not a kohya / A1111 / LyCORIS LoRA, LoCon, LoHa or LoKr file: unknown keys "
            f"({len(unknown)}) such as {', '.join(sorted(unknown)[:4])}. Keys look like "
            "'lora_unet_<module>.lora_down.weight'; a diffusers or peft adapter loads from its folder")
    if refused:
        raise AdapterLoadError(f"{source} holds adapters peftvision has no method for: "
                               f"{'; '.join(sorted(refused)[:4])}{' ...' if len(refused) > 4 else ''}")
    for layer in layers.values():
        _check_complete(layer, source)
    return layers


def _check_complete(layer: FileLayer, source: Path) -> None:
    f = layer.factors
    if not layer.kind:
        raise CorruptAdapterError(f"{source}: {layer.key} has an alpha but no weights")
    if layer.kind == "lokr":
        # each factor either full or as both low-rank halves, never both nor half
        need = [f"{w} (or {w}_a and {w}_b)" for w in ("lokr_w1", "lokr_w2")
                if (w in f) + (f"{w}_a" in f and f"{w}_b" in f) != 1 or (f"{w}_a" in f) != (f"{w}_b" in f)]
    else:
        need = [s for s in KINDS[layer.kind] if s not in f]
    if need:
        raise CorruptAdapterError(f"{source}: {layer.key} lacks {', '.join(need)}; the file is incomplete")
    pairs = {"lora": [("lora_up.weight", 1, "lora_down.weight", 0)],
             "loha": [("hada_w1_a", 1, "hada_w1_b", 0), ("hada_w2_a", 1, "hada_w2_b", 0),
                      ("hada_w1_b", 0, "hada_w2_b", 0)],
             "lokr": [("lokr_w1_a", 1, "lokr_w1_b", 0), ("lokr_w2_a", 1, "lokr_w2_b", 0)]}[layer.kind]
    for x, i, y, j in pairs:  # inner (rank) dimensions agree
        if x in f and y in f and (f[x].dim() <= i or f[y].dim() <= j or f[x].shape[i] != f[y].shape[j]):
            raise CorruptAdapterError(f"{source}: {layer.key}: {x} {tuple(f[x].shape)} and {y} "
                                      f"{tuple(f[y].shape)} have different ranks; the file is corrupt")


def rank_of(layer: FileLayer) -> int | None:
    """The layer's rank r (None: a LoKr with no low-rank factor)."""
    f = layer.factors
    if layer.kind == "lora":
        return f["lora_down.weight"].shape[0]
    if layer.kind == "loha":
        return f["hada_w1_b"].shape[0]
    for low in ("lokr_w2_b", "lokr_w1_b"):
        if low in f:
            return f[low].shape[0]
    return None


def scale_of(layer: FileLayer) -> float:
    """The layer's ΔW multiplier as A1111 and diffusers compute it."""
    r = rank_of(layer)
    if r is None:  # LoKr with full factors: alpha is not used
        return 1.0
    return (layer.alpha if layer.alpha is not None else r) / r


# -- module names ---------------------------------------------------------------------------------

def module_index(model: nn.Module) -> dict[str, list[str]]:
    """'down_blocks_0_resnets_0_conv1' -> the module names it can stand for (weighted layers)."""
    from ..targets import iter_base_modules

    index: dict[str, list[str]] = {}
    for name, module in iter_base_modules(model):
        if name and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            index.setdefault(name.replace(".", "_"), []).append(name)
    return index


def resolve(layers: list[FileLayer], prefix_len: dict[str, int], model: nn.Module, what: str,
            source: Path) -> dict[str, FileLayer]:
    """{module name: layer}; every layer must name exactly one Linear / Conv of `model`."""
    index = module_index(model)
    found: dict[str, FileLayer] = {}
    missing = []
    for layer in layers:
        flat = layer.key[prefix_len[layer.key]:]
        # transformers >= 5 builds CLIPTextModel without the text_model level kohya names include
        names = index.get(flat) or index.get(flat.removeprefix("text_model_")) or []
        if not names and flat.startswith(SGM_NAMES + tuple(TOP)):  # SDXL: the original UNet's names
            names = index.get(to_diffusers(flat, model) or "", [])
        if len(names) > 1:
            raise AdapterLoadError(f"{source}: {layer.key} could name {' or '.join(names)} in the "
                                   f"{what}; the file cannot be mapped onto this model")
        if names:
            found[names[0]] = layer
        else:
            missing.append(layer.key)
    if missing:
        sgm = any(s in k for k in missing for s in SGM_NAMES)
        hint = (" These are the original (SGM / LDM) UNet's block names of an SDXL file; they do "
                "not fit this UNet's blocks (layers_per_block, block types)" if sgm else
                f" Is it a LoRA for another model than this {type(model).__name__}?")
        raise AdapterLoadError(f"{source}: {len(missing)} layer(s) name no Linear / Conv module of the "
                               f"{what}, such as {', '.join(sorted(missing)[:3])}.{hint}")
    return found


# -- conversion -----------------------------------------------------------------------------------

def _pad(t: Tensor, dim: int, size: int) -> Tensor:
    """`t` zero-padded along `dim` to `size` (a smaller rank inside a larger one: ΔW unchanged)."""
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _times(t: Tensor, ratio: float) -> Tensor:
    """`t`·ratio, computed in fp32 at least (files are often fp16; the model's copy casts back)."""
    if ratio == 1:
        return t
    return t.to(torch.promote_types(t.dtype, torch.float32)) * ratio


def _common_scale(layers: dict[str, FileLayer]) -> float:
    """The scale most layers share (first seen on ties): those need no folding."""
    return Counter(scale_of(layer) for layer in layers.values()).most_common(1)[0][0]


def _convert_lora(layers: dict[str, FileLayer], model: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    r = max(rank_of(layer) for layer in layers.values())
    s = _common_scale(layers)
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        down, up = layer.factors["lora_down.weight"], layer.factors["lora_up.weight"]
        module = model.get_submodule(name)
        # SD 1's proj_in / proj_out are 1x1 convs, SD 2's (use_linear_projection) Linear layers
        if isinstance(module, nn.Linear) and down.dim() == 4 and down.shape[2:].numel() == 1:
            down, up = down.flatten(1), up.flatten(1)
        elif isinstance(module, nn.Conv2d) and down.dim() == 2 and module.weight.shape[2:].numel() == 1:
            down, up = down[..., None, None], up[..., None, None]
        ratio = scale_of(layer) / s
        tensors[f"{name}.lora_A"] = _pad(down, 0, r)  # (r, in[, k, k])
        tensors[f"{name}.lora_B"] = _pad(_times(up, ratio), 1, r)  # (out, r[, 1, 1])
    config = {"r": r, "alpha": s * r, "dropout": 0.0, "targets": sorted(layers), "qkv_parts": None,
              "use_rslora": False, "use_dora": False}
    return config, tensors


def _convert_loha(layers: dict[str, FileLayer], model: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    r = max(rank_of(layer) for layer in layers.values())
    s = _common_scale(layers)
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        f = {k: v.flatten(1) for k, v in layer.factors.items()}  # (out, r) / (r, in·k·k)
        ratio = scale_of(layer) / s
        f["hada_w1_a"] = _times(f["hada_w1_a"], ratio)
        for k, t in f.items():
            tensors[f"{name}.{k}"] = _pad(t, 1 if k.endswith("_a") else 0, r)
    return {"r": r, "alpha": s * r, "targets": sorted(layers)}, tensors


def _lokr_layout(layers: dict[str, FileLayer], model: nn.Module, source: Path) -> tuple[int, int, bool]:
    """(r, factor, decompose_both) with which peftvision's LoKr builds every layer as the file has it."""
    ranks = {rank_of(layer) for layer in layers.values()} - {None}
    both = any("lokr_w1_a" in layer.factors for layer in layers.values())
    shapes = {}
    for name, layer in layers.items():
        weight = model.get_submodule(name).weight  # (out, in/g, *k)
        f = layer.factors
        a = f["lokr_w1"].shape[0] if "lokr_w1" in f else f["lokr_w1_a"].shape[0]
        c = f["lokr_w1"].shape[1] if "lokr_w1" in f else f["lokr_w1_b"].shape[1]
        shapes[name] = (weight.shape[0], weight.shape[1], a, c)
    candidates = [-1] + sorted({x for _, _, a, c in shapes.values() for x in (a, c)})
    factor = next((k for k in candidates if all(
        factorization(o, k)[0] == a and factorization(i, k)[0] == c for o, i, a, c in shapes.values())), None)
    if factor is None:
        raise AdapterLoadError(f"{source}: its LoKr factor shapes follow no single `factor` (LyCORIS' "
                               "factorization); peftvision's lokr uses one for every layer")
    if ranks:
        r = max(ranks)
    else:  # full factors only: any r at least half the largest second factor keeps W2 full
        r = max(math.ceil(max(o // a, i // c) / 2) for o, i, a, c in shapes.values())
    for name, layer in layers.items():
        o, i, a, c = shapes[name]
        w1_low = both and r < max(a, c) / 2
        w2_low = r < max(o // a, i // c) / 2
        if w1_low != ("lokr_w1_a" in layer.factors) or w2_low != ("lokr_w2_a" in layer.factors):
            raise AdapterLoadError(
                f"{source}: {layer.key} keeps {'W1 low rank' if 'lokr_w1_a' in layer.factors else 'W1 full'} "
                f"and {'W2 low rank' if 'lokr_w2_a' in layer.factors else 'W2 full'}, which peftvision's "
                f"lokr (one r={r} for every layer) builds otherwise; the file mixes ranks LyCORIS' rule "
                "cannot give with one rank")
    return r, factor, both


def _convert_lokr(layers: dict[str, FileLayer], model: nn.Module, source: Path) -> tuple[dict, dict]:
    r, factor, both = _lokr_layout(layers, model, source)
    s = _common_scale(layers)
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        f = dict(layer.factors)
        ratio = scale_of(layer) / s
        first = "lokr_w1" if "lokr_w1" in f else "lokr_w1_a"
        f[first] = _times(f[first], ratio)
        for k, t in f.items():
            if k in ("lokr_w1_a", "lokr_w2_a"):
                t = _pad(t, 1, r)  # (a | b, r)
            elif k in ("lokr_w1_b", "lokr_w2_b"):
                t = _pad(t.flatten(1), 0, r)  # (r, c) | (r, d·k·k)
            tensors[f"{name}.{k}"] = t
    return {"r": r, "alpha": s * r, "factor": factor, "decompose_both": both,
            "targets": sorted(layers)}, tensors


def convert(layers: dict[str, FileLayer], model: nn.Module, source: Path) -> tuple[dict, dict[str, Tensor]]:
    """{module: file layer} of one model -> (peftvision adapter config, tensors): one method per kind."""
    methods, tensors = [], {}
    for kind in KINDS:
        mine = {name: layer for name, layer in layers.items() if layer.kind == kind}
        if not mine:
            continue
        if kind == "lokr":
            config, found = _convert_lokr(mine, model, source)
        else:
            config, found = (_convert_lora if kind == "lora" else _convert_loha)(mine, model)
        # the method's own to_dict: every field, as a folder save records it (hotswap compares them)
        methods.append({"name": kind, "config": json.loads(json.dumps(get_method(kind)(**config).to_dict()))})
        tensors.update(found)
    config = {"methods": methods, "base_model": {}, "train_head": False, "from_peft": True}
    return config, tensors


def read_kohya(path: Path, models: dict[str, nn.Module | None]) -> list[Part]:
    """The file's adapters for each model given (keys of PREFIXES' values), all checked before
    anything is applied; layers for a model not given are reported and skipped."""
    tensors, _ = read_file(path)
    layers = parse_layers(tensors, path)
    if not layers:
        raise AdapterLoadError(f"{path} holds no adapter weights")
    by_target: dict[str, list[FileLayer]] = {}
    prefix_len: dict[str, int] = {}
    for layer in layers.values():
        prefix = next(p for p in PREFIXES if layer.key.startswith(p))
        prefix_len[layer.key] = len(prefix)
        by_target.setdefault(PREFIXES[prefix], []).append(layer)
    skipped = {t: len(ls) for t, ls in by_target.items() if models.get(t) is None}
    if skipped:
        what = ", ".join(f"{n} {t} layer(s)" for t, n in skipped.items())
        hint = " and ".join(f"{t}=" for t in skipped)
        warnings.warn(f"{path}: skipped {what}; pass {hint} to load_adapter to load them too "
                      "(outputs then differ from the full LoRA's)", stacklevel=4)
    parts = []
    for target, found in by_target.items():
        model = models.get(target)
        if model is None:
            continue
        resolved = resolve(found, prefix_len, model, target.replace("_", " "), path)
        config, converted = convert(resolved, model, path)
        parts.append(Part(target, config, converted))
    if not parts:
        raise AdapterLoadError(f"{path} holds only {', '.join(sorted(by_target))} layers and none of "
                               "them was given; pass text_encoder= (a transformers CLIPTextModel)")
    return parts
