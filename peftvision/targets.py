"""Which modules a method touches: architecture detection, target matching, and presets.

A target spec is one of:
- None: the method's preset for the detected architecture;
- a string: a regular expression that must match a module's full dotted name;
- a sequence of strings and/or module types: a string matches a module whose name equals it or
  ends with "." + it (so "qkv" matches "blocks.0.attn.qkv"); a type matches by isinstance.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator, Sequence

from torch import nn

from .errors import TargetError

TargetSpec = None | str | Sequence[str | type]

VIT, RESNET, UNET, GENERIC = "vit", "resnet", "unet", "generic"
ARCHITECTURES = (VIT, RESNET, UNET, GENERIC)

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _loaded_class(module_name: str, class_name: str) -> type | None:
    """A class from an optional package, only if that package is already imported.

    A model of that class cannot exist otherwise, so this never imports timm or diffusers."""
    module = sys.modules.get(module_name)
    return getattr(module, class_name, None) if module is not None else None


def detect_architecture(model: nn.Module) -> str:
    """The registered family of `model` ("vit", "resnet", "swin", "unet"...; see
    architectures.py), or "generic" when no registration recognises it."""
    from .architectures import detect_architecture as detect

    return detect(model)


def iter_base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules of the user's model, skipping modules that peftvision inserted.

    Wrapped layers are reported under their original name (the wrapper's), so presets and user
    targets see the same names before and after other methods were applied."""
    from .layers import Adapter, AdapterLayer

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        if isinstance(module, AdapterLayer):
            yield from walk(module.base_layer, prefix)
            return
        if isinstance(module, Adapter):
            return
        yield prefix, module
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(model, "")


def check_target_spec(method: str, spec: object) -> None:
    """Raise TargetError unless `spec` is None, a regex string, a module type, or a sequence of
    names and types."""
    if spec is None or isinstance(spec, (str, type)):
        if isinstance(spec, str):
            try:
                re.compile(spec)
            except re.error as exc:
                raise TargetError(f"{method}: targets {spec!r} is not a valid regular expression ({exc})") from exc
        return
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, (str, type)) for s in spec):
        return
    raise TargetError(f"{method}: targets must be None, a regex string, or a non-empty list of module "
                      f"names and/or nn.Module types, got {spec!r}")


# Named target sets for models no registration covers: pass targets="all-linear".
NAMED_SETS: dict[str, tuple[type[nn.Module], ...]] = {
    "all-linear": (nn.Linear,),
    "all-conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
}


def _name_matcher(spec: TargetSpec) -> Callable[[str, nn.Module], bool]:
    if isinstance(spec, str) and spec in NAMED_SETS:
        types_ = NAMED_SETS[spec]
        return lambda name, module: isinstance(module, types_)
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda name, module: pattern.fullmatch(name) is not None
    if isinstance(spec, type):
        spec = [spec]
    names = [s for s in spec if isinstance(s, str)]
    types = tuple(s for s in spec if isinstance(s, type))
    bad = [s for s in spec if not isinstance(s, (str, type))]
    if bad:
        raise TargetError(f"targets must be names, a regex string or module types, got {bad!r}")

    def match(name: str, module: nn.Module) -> bool:
        if types and isinstance(module, types):
            return True
        return any(name == n or name.endswith("." + n) for n in names)

    return match


def find_targets(
    model: nn.Module,
    spec: TargetSpec,
    *,
    method: str,
    allowed: tuple[type[nn.Module], ...] = (nn.Module,),
    exclude: Sequence[str] = (),
) -> list[tuple[str, nn.Module]]:
    """Modules of `model` matching `spec` (a user spec or a preset), of an `allowed` type.

    Raises TargetError naming the spec and some module names when nothing matches."""
    match = _name_matcher(spec)
    excluded = tuple(exclude)
    found = [
        (name, module)
        for name, module in iter_base_modules(model)
        if name
        and match(name, module)
        and isinstance(module, allowed)
        and not any(name == e or name.startswith(e + ".") for e in excluded)
    ]
    if not found:
        kinds = "/".join(t.__name__ for t in allowed)
        examples = [n for n, m in iter_base_modules(model) if n and isinstance(m, allowed)][:8]
        hint = (f"; {kinds} modules of this model include: {', '.join(examples)}"
                if examples else f"; this model has no {kinds} modules")
        raise TargetError(
            f"{method}: targets {spec!r} match no {kinds} module of {type(model).__name__}"
            f"{hint}. Pass targets=[...] with module names, a regex, module types, or a named set "
            f"({', '.join(repr(n) for n in NAMED_SETS)})."
        )
    return found


def head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The classifier head: timm's `get_classifier()` (found by identity, not by name)."""
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return []
    from .layers import AdapterLayer

    found = get_classifier()
    heads = []  # DeiT distilled returns two heads (head, head_dist)
    for head in found if isinstance(found, (tuple, list)) else (found,):
        if isinstance(head, AdapterLayer):  # e.g. TSA's pre-classifier alignment wraps the head
            head = head.weighted_layer
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            heads.append(head)
    return [(name, module) for name, module in iter_base_modules(model)
            if any(module is head for head in heads)]


# ---- presets: default target specs per method and architecture ----------------------------

VIT_BLOCK = r"blocks\.\d+"
# SSF sites in a timm ViT: after the patch projection, every block's linears and norms, final norm.
VIT_SSF = (rf"patch_embed\.proj|{VIT_BLOCK}\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)"
           r"|norm|fc_norm")
VIT_ATTENTION = rf"{VIT_BLOCK}\.attn"
VIT_QKV = rf"{VIT_BLOCK}\.attn\.qkv"
# ResNet: the convs that are direct children of a residual block (conv1..conv3), not downsample.
RESNET_BLOCK_CONVS = r"layer\d+\.\d+\.conv\d+"
UNET_ATTENTION_PROJ = r".*\.attn\d+\.(to_q|to_k|to_v|to_out\.0)"
UNET_ATTENTIONS = r".*attentions\.\d+"
