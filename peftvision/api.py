"""apply / merge / unmerge / unload: method -> targets -> swap."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any, TypeVar

from torch import nn

from .errors import ConfigError, MergeError
from .identity import base_identity
from .layers import AdapterLayer
from .methods.base import ApplyContext, Method, make_config
from .registry import get_method
from .state import STATE_ATTR, PeftState, get_state, iter_parameters, require_state
from .surgery import Journal, decouple_conv_biases, get_module, restore_conv_classes, unwrap_all
from .targets import detect_architecture, head_modules

ModelT = TypeVar("ModelT", bound=nn.Module)
MethodSpec = str | Method


def resolve_methods(method: MethodSpec | Sequence[MethodSpec], cfg: dict[str, Any]) -> list[Method]:
    """Names, config objects or a list of them -> validated config objects."""
    specs = [method] if isinstance(method, (str, Method)) else list(method)
    if not specs:
        raise ConfigError("apply needs at least one method, e.g. apply(model, 'lora', r=8)")
    if cfg and len(specs) > 1:
        raise ConfigError(
            "keyword options are ambiguous with several methods; pass config objects instead, "
            "e.g. apply(model, [peftvision.config('lora', r=8), 'bias'])")
    resolved = []
    for spec in specs:
        if isinstance(spec, Method):
            if cfg:
                raise ConfigError(f"options {sorted(cfg)} given together with a {spec.name} config "
                                  "object; set them on the config instead")
            resolved.append(spec)
        elif isinstance(spec, str):
            resolved.append(make_config(get_method(spec), **cfg))
        else:
            raise ConfigError(f"a method is a name or a config object, got {type(spec).__name__}")
    names = [m.name for m in resolved]
    if len(set(names)) != len(names):
        raise ConfigError(f"method listed twice: {names}")
    return resolved


# Methods that define the whole trainable set and so combine with nothing else.
STANDALONE = {
    "linear": "linear probing trains only the head, which every method already keeps trainable; "
              "drop 'linear'",
    "full": "full fine-tuning already trains every parameter; use 'full' alone",
}


def check_combination(names: list[str]) -> None:
    for name, why in STANDALONE.items():
        if name in names and len(names) > 1:
            others = [n for n in names if n != name]
            raise ConfigError(f"{name!r} cannot be combined with {others}: {why}")


def config(name: str, **cfg: Any) -> Method:
    """A validated config object for method `name`, e.g. config("lora", r=16)."""
    return make_config(get_method(name), **cfg)


def apply(model: ModelT, method: MethodSpec | Sequence[MethodSpec], *,
          train_head: bool | None = None, fast_conv_bias: bool | None = None, **cfg: Any) -> ModelT:
    """Apply one or more PEFT methods to `model` in place and return it.

    The base model is frozen, the classifier head stays trainable unless `train_head=False`,
    and what was applied is recorded on the model (peftvision.applied). `fast_conv_bias`
    (default True) lets a conv whose bias trains while its weight is frozen add the bias outside
    the conv, so backward computes no weight gradient; it does so by giving the conv a subclass
    of its class (isinstance holds, pickles name the original class); False leaves every module's
    class as it is. Both are decided by the first apply; later calls keep them. On any error the
    model is left as it was.
    """
    methods = resolve_methods(method, cfg)
    previous = get_state(model)
    if train_head is None:
        train_head = previous.train_head if previous is not None else True
    if fast_conv_bias is None:
        fast_conv_bias = previous.fast_conv_bias if previous is not None else True
    if previous is not None:
        if train_head != previous.train_head:
            raise ConfigError(f"train_head={train_head} differs from the first apply "
                              f"(train_head={previous.train_head}); unload and apply again to change it")
        if fast_conv_bias != previous.fast_conv_bias:
            raise ConfigError(f"fast_conv_bias={fast_conv_bias} differs from the first apply "
                              f"(fast_conv_bias={previous.fast_conv_bias}); unload and apply again "
                              "to change it")
        if any(isinstance(m, AdapterLayer) and m.merged for m in model.modules()):
            raise MergeError("the model's adapters are merged; call peftvision.unmerge(model) "
                             "before applying more methods")
        applied = {m.name for m in previous.methods}
        again = [m.name for m in methods if m.name in applied]
        if again:
            raise ConfigError(f"method(s) {again} are already applied to this model")
    check_combination([m.name for m in (previous.methods if previous else [])] + [m.name for m in methods])
    state = copy.deepcopy(previous) if previous is not None else PeftState(
        architecture=detect_architecture(model),
        base_identity=base_identity(model),
        original_requires_grad={e.canonical: e.param.requires_grad for e in iter_parameters(model)},
        train_head=train_head,
        fast_conv_bias=fast_conv_bias,
    )
    grad_before = {e.param: e.param.requires_grad for e in iter_parameters(model)}
    journal = Journal()
    try:
        if previous is None:
            model.requires_grad_(False)
        heads = {name for name, _ in head_modules(model)}
        ctx = ApplyContext(model, state, journal, heads)
        for m in methods:
            m.apply_to(ctx)
            state.methods.append(ctx.recorded.get(m.name, m))
        if train_head:
            for name in heads:
                for entry in iter_parameters(get_module(model, name)):
                    if entry.adapter is None:
                        entry.param.requires_grad_(True)
                        canonical = f"{name}.{entry.canonical}"
                        if canonical not in state.head:
                            state.head.append(canonical)
        if fast_conv_bias:
            decouple_conv_biases(model, journal)
    except BaseException:
        journal.rollback()
        for param, flag in grad_before.items():
            param.requires_grad_(flag)
        raise
    object.__setattr__(model, STATE_ATTR, state)
    return model


def _adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    return [m for m in model.modules() if isinstance(m, AdapterLayer)]  # outer before inner


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer's weights (selective methods need nothing)."""
    require_state(model, "merge")
    layers = _adapter_layers(model)
    _check_mergeable(layers, "merge")
    if layers and all(m.merged for m in layers):
        warnings.warn("peftvision.merge: the adapters are already merged; nothing to do", stacklevel=2)
        return model
    _merge_layers(layers)
    return model


def _check_mergeable(layers: list[AdapterLayer], action: str) -> None:
    """Refuse before touching any weight, so a refused merge changes nothing."""
    refusing = sorted({b for b in (m.merge_blocker() for m in layers) if b})
    if refusing:
        raise MergeError(f"{action}: cannot merge {', '.join(refusing)}. Keep the adapters "
                         "unmerged, or unload(model, merge=False) to drop them")


def _merge_layers(layers: list[AdapterLayer]) -> None:
    """Merge all or nothing: if one layer refuses, the ones already merged are unmerged again."""
    done: list[AdapterLayer] = []
    try:
        for layer in reversed(layers):  # innermost first, so nested adapters compose in order
            if not layer.merged:
                layer.merge()
                done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge()
        raise


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: restore the base weights and run the adapters separately again."""
    require_state(model, "unmerge")
    for layer in _adapter_layers(model):  # outermost first: the exact inverse of merge's order
        layer.unmerge()
    return model


def unload(model: ModelT, merge: bool = False) -> ModelT:
    """Remove every peftvision change and return the plain model.

    merge=True folds mergeable adapters into the weights first (for deployment); merge=False
    drops them and restores the original weights and requires_grad flags.
    """
    state = require_state(model, "unload")
    if merge:
        layers = _adapter_layers(model)
        _check_mergeable(layers, "unload(merge=True)")
        _merge_layers(layers)
    else:
        unmerge(model)
    for method in reversed(state.methods):
        method.remove_from(model)
    unwrap_all(model)
    restore_conv_classes(model)
    for entry in iter_parameters(model):
        entry.param.requires_grad_(state.original_requires_grad.get(entry.canonical, True))
    object.__delattr__(model, STATE_ATTR)
    return model
