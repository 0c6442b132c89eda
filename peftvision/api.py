"""apply / merge / unmerge / unload: method -> targets -> swap."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import ConfigError, MergeError
from .identity import base_identity
from .layers import AdapterLayer, adapter_dtype_scope
from .log import log_apply
from .methods.base import ApplyContext, Method, make_config
from .named import activate, check_adapter_name, install, register, slot_tensor, tensor_slots
from .registry import get_method
from .state import (
    STATE_ATTR,
    AdapterSet,
    PeftState,
    get_adapters,
    iter_buffers,
    iter_parameters,
    require_state,
)
from .surgery import Journal, decouple_conv_biases, get_module, restore_conv_classes, unwrap_all
from .targets import detect_architecture, head_modules
from .wrappers import unwrap

ModelT = TypeVar("ModelT", bound=nn.Module)
MethodSpec = str | Method


def resolve_methods(method: MethodSpec | Sequence[MethodSpec], cfg: dict[str, Any]) -> list[Method]:
    """Names, config objects or a list of them -> validated config objects."""
    if not isinstance(method, (str, Method, list, tuple)):
        raise ConfigError(f"method must be a name such as 'lora', a config object, or a list of them, "
                          f"got {method!r}; see peftvision.methods() for the names")
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


def check_adapter_dtype(value: Any) -> torch.dtype | str | None:
    if value is None or value == "base" or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    raise ConfigError(f"adapter_dtype must be None (fp32 beside a half-precision base), 'base' or a "
                      f"floating torch dtype such as torch.float32, got {value!r}")


def apply(model: ModelT, method: MethodSpec | Sequence[MethodSpec], *, adapter_name: str | None = None,
          train_head: bool | None = None, keep_original: bool | None = None,
          adapter_dtype: torch.dtype | str | None = None, fast_conv_bias: bool | None = None,
          **cfg: Any) -> ModelT:
    """Apply one or more PEFT methods to `model` in place and return it.

    The base model is frozen, the classifier head stays trainable unless `train_head=False`,
    and what was applied is recorded on the model (peftvision.applied). On any error the model
    is left as it was. `train_head`, `keep_original` and `fast_conv_bias` are decided by the
    first apply; later calls keep them.

    adapter_name: the named adapter to add the methods to (peftvision.named). The first one is
    "default" when not named; None later means the only (or the only active) adapter. A new name
    adds an adapter with its own parameters, head and BatchNorm statistics, applied as if it
    were alone on the model; it starts inactive (peftvision.set_adapter activates it).

    keep_original (default True): keep a copy of every user tensor training can change (selected
    parameters, the head, buffers such as BatchNorm statistics) so that unload(merge=False)
    restores the model bitwise; False saves that memory (for "full", a whole copy of the model)
    and unload(merge=False) then leaves those tensors as trained.
    adapter_dtype: the dtype of new adapter parameters. None (default): float32 beside a float16 /
    bfloat16 base (what torch.amp.GradScaler needs), else the base's dtype; "base": the base
    layer's dtype; or a floating torch dtype.
    fast_conv_bias (default True): a conv whose bias trains while its weight is frozen adds the
    bias outside the conv, so backward computes no weight gradient; it does so by giving the conv
    a subclass of its class (isinstance holds, pickles name the original class); False leaves
    every module's class as it is.
    """
    if train_head is not None and not isinstance(train_head, bool):
        raise ConfigError(f"train_head must be True, False or None (keep the first apply's choice), "
                          f"got {train_head!r}")
    wrapper, model = model, unwrap(model)
    methods = resolve_methods(method, cfg)
    adapter_dtype = check_adapter_dtype(adapter_dtype)
    found = get_adapters(model)
    own = check_adapter_name(adapter_name, found)
    first = found.first if found is not None else None  # model-wide choices come from it
    previous = found.states.get(own) if found is not None else None
    if train_head is None:
        train_head = first.train_head if first is not None else True
    if keep_original is None:
        keep_original = first.keep_original if first is not None else True
    if not isinstance(train_head, bool) or not isinstance(keep_original, bool):
        raise ConfigError(f"train_head and keep_original must be True or False, got "
                          f"{train_head!r} and {keep_original!r}")
    if fast_conv_bias is None:
        fast_conv_bias = first.fast_conv_bias if first is not None else True
    if not isinstance(fast_conv_bias, bool):
        raise ConfigError(f"fast_conv_bias must be True or False, got {fast_conv_bias!r}")
    if first is not None:
        if train_head != first.train_head:
            raise ConfigError(f"train_head={train_head} differs from the first apply "
                              f"(train_head={first.train_head}); unload and apply again to change it")
        if keep_original != first.keep_original:
            raise ConfigError(f"keep_original={keep_original} differs from the first apply "
                              f"(keep_original={first.keep_original}); unload and apply again to change it")
        if fast_conv_bias != first.fast_conv_bias:
            raise ConfigError(f"fast_conv_bias={fast_conv_bias} differs from the first apply "
                              f"(fast_conv_bias={first.fast_conv_bias}); unload and apply again "
                              "to change it")
        if any(isinstance(m, AdapterLayer) and m.merged for m in model.modules()):
            raise MergeError("the model's adapters are merged; call peftvision.unmerge(model) "
                             "before applying more methods")
        if previous is None and not keep_original:
            raise ConfigError(f"adapter {own!r} would be a second adapter, which starts from the "
                              "base model's values: that needs apply(keep_original=True) (the "
                              "default) on the first apply")
    if previous is not None:
        applied = {m.name for m in previous.methods}
        again = [m.name for m in methods if m.name in applied]
        if again:
            where = "this model" if len(found.states) == 1 else f"adapter {own!r}"
            raise ConfigError(f"method(s) {again} are already applied to {where}"
                              + ("" if len(found.states) > 1 else
                                 "; add another adapter with apply(..., adapter_name='name')"))
    check_combination([m.name for m in (previous.methods if previous else [])] + [m.name for m in methods])
    if previous is not None:
        state = copy.deepcopy(previous)
    elif first is not None:  # a new adapter beside others: the same base, nothing applied yet
        state = PeftState(
            architecture=first.architecture, base_identity=first.base_identity,
            original_requires_grad=first.original_requires_grad, train_head=train_head,
            keep_original=keep_original, base_keys=first.base_keys, fast_conv_bias=fast_conv_bias,
            adapter_name=own, originals=found.originals)
    else:
        state = PeftState(
            architecture=detect_architecture(model),
            base_identity=base_identity(model),
            original_requires_grad={e.canonical: e.param.requires_grad for e in iter_parameters(model)},
            train_head=train_head,
            keep_original=keep_original,
            base_keys=list(model.state_dict()),
            fast_conv_bias=fast_conv_bias,
            adapter_name=own,
        )
        # buffers change in train mode whatever the method (BatchNorm statistics)
        for entry in iter_buffers(model):
            if entry.adapter is None:
                state.keep(entry.canonical, getattr(entry.module, entry.attr))
    restore_active = found.active if found is not None else None
    grad_before = {e.param: e.param.requires_grad for e in iter_parameters(model)}
    journal = Journal()
    try:
        if found is not None:  # apply as if this adapter were alone on the model
            activate(model, (own,) if previous is not None else ())
        if first is None:
            model.requires_grad_(False)
        heads = {name for name, _ in head_modules(model)}
        ctx = ApplyContext(model, state, journal, heads)
        with adapter_dtype_scope(adapter_dtype):
            for m in methods:
                ctx.require_architecture(m)  # once here, so no method checks its family itself
                m.apply_to(ctx)
                state.methods.append(ctx.recorded.get(m.name, m))
        if train_head:
            for name in heads:
                for entry in iter_parameters(get_module(model, name)):
                    if entry.adapter is None:
                        canonical = f"{name}.{entry.canonical}"
                        state.keep(canonical, entry.param)
                        entry.param.requires_grad_(True)
                        if canonical not in state.head:
                            state.head.append(canonical)
        if fast_conv_bias:
            decouple_conv_biases(model, journal)
    except BaseException:
        journal.rollback()
        for param, flag in grad_before.items():
            param.requires_grad_(flag)
        if found is not None:
            activate(model, restore_active)
        raise
    if found is None:
        found = AdapterSet(states={own: state}, active=(own,), originals=state.originals)
        object.__setattr__(model, STATE_ATTR, found)
    else:
        found.originals.update(state.originals)  # base values first kept by this apply
        state.originals = found.originals
        found.states[own] = state
        found.active = (own,)  # apply ran with this adapter alone active
    register(model, found, state)
    if restore_active is not None:
        activate(model, restore_active)
    log_apply(model, methods, state)
    return wrapper


def _require_applied(model: nn.Module, action: str) -> AdapterSet:
    found = get_adapters(model)
    if found is None:
        require_state(model, action)  # raises NotAppliedError
    return found


def _adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    return [m for m in model.modules() if isinstance(m, AdapterLayer)]  # outer before inner


def merge(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Fold the active adapters (or the active adapter `adapter_name`) into their base layers'
    weights; selective methods need nothing. Inactive adapters stay as they are."""
    wrapper, model = model, unwrap(model)
    found = _require_applied(model, "merge")
    if adapter_name is not None:
        require_state(model, "merge", adapter_name)
        if adapter_name not in found.active:
            raise MergeError(f"merge: adapter {adapter_name!r} is not active; activate it first "
                             f"with peftvision.set_adapter(model, {adapter_name!r})")
    layers = [m for m in _adapter_layers(model)
              if m.active and (adapter_name is None or m.adapter_name == adapter_name)]
    _check_mergeable(layers, "merge")
    if layers and all(m.merged for m in layers):
        warnings.warn("peftvision.merge: the adapters are already merged; nothing to do", stacklevel=2)
        return wrapper
    _merge_layers(layers)
    return wrapper


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
    wrapper, model = model, unwrap(model)
    _require_applied(model, "unmerge")
    for layer in _adapter_layers(model):  # outermost first: the exact inverse of merge's order
        layer.unmerge()
    return wrapper


def unload(model: ModelT, merge: bool = False) -> ModelT:
    """Remove every peftvision change and return the plain model.

    merge=True folds mergeable adapters into the weights first (for deployment) and keeps the
    trained selected parameters, head and statistics; its state dict loads strictly into a fresh
    base model, except for `bias` entries that merging a shift (SSF) adds to bias-free layers:
    a warning names them (load those with strict=False, or keep the merged model as saved).
    merge=False drops the adapters and restores the original model: weights, selected parameters,
    head, buffers and requires_grad flags, bitwise (unless apply(keep_original=False)); after
    merge/unmerge cycles, layers whose unmerge runs the inverse (LoRA, TSA's α, SSF and DiffFit
    with no tiny scale) are restored within rounding, the others bitwise (layers.py).
    """
    wrapper, model = model, unwrap(model)
    found = _require_applied(model, "unload")
    state = found.first
    if merge:
        layers = [m for m in _adapter_layers(model) if m.active]
        _check_mergeable(layers, "unload(merge=True)")
        _merge_layers(layers)
    else:
        unmerge(model)
    _reinstall_user_tensors(model, found, keep_values=merge)
    for adapter in reversed(found.states.values()):
        for method in reversed(adapter.methods):
            method.remove_from(model)
    unwrap_all(model)
    restore_conv_classes(model)
    for entry in iter_parameters(model):
        entry.param.requires_grad_(state.original_requires_grad.get(entry.canonical, True))
    if not merge:
        _restore_originals(model, state)
    object.__delattr__(model, STATE_ATTR)
    if merge:
        added = sorted(set(model.state_dict()) - set(state.base_keys))
        if added:
            warnings.warn(f"peftvision.unload(merge=True) added {len(added)} key(s) that the base "
                          f"model does not have: {', '.join(added)} (a shift merged into a "
                          "bias-free layer); load this state dict into a fresh base model with "
                          "strict=False, or keep the merged model as saved", stacklevel=2)
    return wrapper


@torch.no_grad()
def _reinstall_user_tensors(model: nn.Module, found: AdapterSet, keep_values: bool) -> None:
    """Put the user's own tensor objects back where adapters installed copies; with
    `keep_values`, carrying the values the model computes with now (the active adapters')."""
    slots = tensor_slots(model)
    for canonical, user in found.user.items():
        slot = slots[canonical]
        live = slot_tensor(slot)
        if live is not user:
            if keep_values:
                user.copy_(live)
            install(slot, user)


@torch.no_grad()
def _restore_originals(model: nn.Module, state: PeftState) -> None:
    """Write back the copies apply kept (model already unwrapped: names are canonical)."""
    if not state.originals:
        return
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name, original in state.originals.items():
        if name in tensors:
            tensors[name].copy_(original)
