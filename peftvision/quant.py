"""Quantized base layers (QLoRA, Dettmers et al., NeurIPS 2023): LoRA on bitsandbytes
`Linear8bitLt` and `Linear4bit` layers.

The base weight stays quantized and frozen; the LoRA factors are float parameters (float32 by
default, `apply(adapter_dtype=...)` otherwise) and the branch B·A·x runs in the activations'
float dtype, added to the quantized layer's own output. Merging is refused: W + ΔW would be
re-quantized, rounding the adapter's update away at 4 or 8 bits (peft instead dequantizes, adds
and re-quantizes with a warning). To get a float model with the adapter merged, `dequantize(model)`
first, then `peftvision.merge` / `unload(merge=True)`.

bitsandbytes is optional (`pip install peftvision[quant]`). Only `quantize` and `dequantize`
import it; recognising a bitsandbytes layer reads `sys.modules`, since a model can hold one only
once the user's code imported bitsandbytes.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterable

import torch
from torch import Tensor, nn

BNB_LAYERS = ("Linear8bitLt", "Linear4bit")  # LinearNF4 / LinearFP4 subclass Linear4bit
CPU_4BIT_BLOCK = 64  # Linear4bit's default block size
INSTALL = "pip install 'peftvision[quant]' (or pip install bitsandbytes)"


def bnb_kind(module: nn.Module) -> str | None:
    """"Linear8bitLt" or "Linear4bit" when `module` is that bitsandbytes layer, else None."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is None:  # not imported: no bitsandbytes layer can exist
        return None
    for name in BNB_LAYERS:
        cls = getattr(bnb_nn, name, None)
        if cls is not None and isinstance(module, cls):
            return name
    return None


def is_quantized(module: nn.Module) -> bool:
    """True when `module` holds a weight that is not floating point (int8, packed 4-bit...)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and not weight.is_floating_point()


def logical_shape(param: Tensor) -> torch.Size:
    """The shape a tensor stands for: a packed 4-bit weight's (out, in), else its own shape."""
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return torch.Size(shape) if shape is not None else param.shape


def logical_numel(param: Tensor) -> int:
    """Number of weights `param` stands for (a packed 4-bit tensor holds two per byte)."""
    return math.prod(logical_shape(param))


def compute_like(layer: nn.Module) -> Tensor:
    """A tensor of the dtype and device new adapter parameters beside `layer` take after
    (layers.like_kwargs): the weight itself when it is float, else an empty tensor of the
    layer's compute dtype (Linear4bit's `compute_dtype`; float32 when it has none)."""
    weight = layer.weight
    if weight.is_floating_point():
        return weight
    dtype = getattr(layer, "compute_dtype", None) or torch.float32
    return torch.empty(0, dtype=dtype, device=weight.device)


def describe(module: nn.Module) -> str:
    """e.g. "bitsandbytes Linear4bit (torch.uint8 weights)"."""
    kind = bnb_kind(module)
    dtype = getattr(getattr(module, "weight", None), "dtype", "non-float")
    return f"bitsandbytes {kind} ({dtype} weights)" if kind else f"{type(module).__name__} ({dtype} weights)"


def refusal(method: str, name: str, module: nn.Module, why: str = "") -> str:
    """The message for a method that cannot adapt (or train) the quantized layer `module`."""
    because = f"; {why}" if why else ""
    if bnb_kind(module):
        return (f"{method}: {name} is a {describe(module)}{because}. Of the methods that wrap or "
                "train a layer's weight, only 'lora' (without DoRA, with init 'kaiming' or "
                "'gaussian') runs on bitsandbytes layers (QLoRA). Use lora, leave this layer out "
                "of targets, or peftvision.quant.dequantize(model) first")
    need = ("" if bnb_installed() else f"; bitsandbytes, which QLoRA needs, is not installed: {INSTALL}")
    return (f"{method}: {name} holds {describe(module)}{because}: peftvision adapts floating-point "
            f"layers, and bitsandbytes Linear8bitLt / Linear4bit layers with 'lora'{need}. Dequantize "
            "this layer, quantize with bitsandbytes instead (peftvision.quant.quantize), or leave "
            "it out of targets")


def bnb_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _require_bnb():
    if not bnb_installed():
        raise ImportError(f"peftvision.quant needs bitsandbytes: {INSTALL}")
    import bitsandbytes

    return bitsandbytes


@torch.no_grad()
def dequantized_weight(layer: nn.Module) -> Tensor:
    """The float (out, in) weight a bitsandbytes layer computes with, in its compute dtype.

    Read by running the layer on the identity matrix (bias left out), as peft does for 8 bits:
    every output is one weight times 1, so this is exact whatever layout bitsandbytes keeps
    (4-bit weights repacked for the CPU's bf16 kernels, int8 with row scales). The layer runs in
    train mode meanwhile, so the probe itself never triggers that repacking."""
    if not bnb_kind(layer):
        raise TypeError(f"{type(layer).__name__} is not a bitsandbytes Linear8bitLt / Linear4bit layer")
    if layer.weight.is_floating_point():  # not quantized yet (before .to(device)), or fp16 kept
        return layer.weight.detach().clone()
    dtype = getattr(layer, "compute_dtype", None) or torch.float32
    eye = torch.eye(layer.in_features, dtype=dtype, device=layer.weight.device)  # (in, in)
    bias, training = layer.bias, layer.training
    try:
        layer.bias = None
        layer.train(True)
        return layer(eye).T.contiguous()  # (in, out) -> (out, in)
    finally:
        layer.bias = bias
        layer.train(training)


def _linears(model: nn.Module, skip: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """The plain nn.Linear layers to quantize: not in `skip`, and not read by their parent's own
    code as `child.weight` (timm's EVA runs F.linear(x, qkv.weight, ...), which a quantized
    weight would break)."""
    from .methods.wrap_checks import attributes_read
    from .surgery import get_submodule_parent

    skip = set(skip)
    found = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or name in skip:
            continue
        parent, child = get_submodule_parent(model, name)
        if "weight" not in attributes_read(type(parent)).get(child, ()):
            found.append((name, m))
    return found


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    from .surgery import get_submodule_parent

    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


@torch.no_grad()
def quantize(model: nn.Module, bits: int = 4, *, quant_type: str = "nf4",
             compute_dtype: torch.dtype = torch.float32, skip: Iterable[str] | None = None,
             cpu_bf16_repacking: bool = False) -> nn.Module:
    """Replace the model's nn.Linear layers by bitsandbytes ones holding the same weights,
    quantized (bits=8: Linear8bitLt, LLM.int8() without outliers; bits=4: Linear4bit with
    `quant_type` "nf4" or "fp4"), on the device the weights are on. In place; returns `model`.

    `skip`: module names kept in float; default the classifier head (QLoRA trains it in float).
    Linears whose parent computes with their weight itself (timm EVA's qkv) stay float too.
    `cpu_bf16_repacking`: let bitsandbytes (0.50) repack 4-bit weights for its AVX512-BF16 CPU
    kernels at the first eval-mode forward. Off by default: its state_dict() unpacks them
    inexactly, so the outputs after any state_dict() call differed from those before (1.9e-3
    on a tiny ViT), and repacking fails for in_features < 64.
    For models loaded through transformers, use its BitsAndBytesConfig instead."""
    bnb = _require_bnb()
    if bits not in (4, 8):
        raise ValueError(f"quantize: bits must be 4 or 8, got {bits!r}")
    if skip is None:
        from .targets import head_modules

        skip = [name for name, _ in head_modules(model)]
    linears = _linears(model, skip)
    odd = [name for name, m in linears if m.weight.device.type == "cpu" and m.in_features % CPU_4BIT_BLOCK]
    if bits == 4 and odd:  # checked before any layer changes
        raise ValueError(
            f"quantize: bitsandbytes' CPU 4-bit quantization gives wrong weights when in_features is "
            f"not a multiple of {CPU_4BIT_BLOCK} (measured with 0.50.2: 0.19-0.40 relative error "
            f"instead of NF4's 0.09), which {', '.join(odd[:8])} have. Pass skip=[...] with them, "
            "use bits=8, or quantize on a GPU")
    for name, linear in linears:
        has_bias = linear.bias is not None
        if bits == 8:  # threshold 0: every column int8, no float outlier path
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                        has_fp16_weights=False, threshold=0.0)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                      compute_dtype=compute_dtype, quant_type=quant_type)
            if not cpu_bf16_repacking:
                layer.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward
        layer.load_state_dict(linear.state_dict())
        layer.train(linear.training)
        _replace(model, name, layer.to(linear.weight.device))  # .to() quantizes the weight
    return model


@torch.no_grad()
def dequantize(model: nn.Module) -> nn.Module:
    """Replace every bitsandbytes layer by an nn.Linear holding its dequantized weight (and the
    same bias tensor), also under adapters, so that merge / unload(merge=True) can fold them
    in. In place; returns `model`. The weights are the quantized ones: the rounding stays."""
    from .layers import AdapterLayer

    for name, module in list(model.named_modules()):
        if not bnb_kind(module):
            continue
        weight = dequantized_weight(module)  # (out, in), in the compute dtype
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = module.bias
        linear.train(module.training)
        holder = next((m for m in model.modules()
                       if isinstance(m, AdapterLayer) and m.base_layer is module), None)
        if holder is not None:
            holder.base_layer = linear
        else:
            _replace(model, name, linear)
    return model
