"""Several named adapters on one model: list, activate, disable, delete.

Every AdapterLayer belongs to one adapter (`layer.adapter_name`); an inactive layer is its base
layer (layers.py). A user tensor that adapters train (selected parameters, the head, BatchNorm
statistics) gets one copy per owning adapter, kept in `AdapterSet.banks`; activating installs
the active owner's copy in the model, or a frozen copy of the original when no active adapter
owns it. So each adapter trains and computes exactly as if it were alone on the model, and the
base model is one `disable_adapters` away.

Several active adapters add their effects: additive layers stack, and a tensor that two active
adapters train becomes base + Σ(own copy - base), frozen while they are active together (train
one adapter at a time).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .errors import ConfigError, MergeError, NotAppliedError
from .layers import Adapter, AdapterLayer
from .state import AdapterSet, PeftState, get_adapters, iter_buffers, iter_parameters
from .wrappers import unwrap

DEFAULT = "default"


def adapters(model: nn.Module) -> tuple[str, ...]:
    """The names of the adapters on `model`, in the order they were added (() when none)."""
    found = get_adapters(unwrap(model))
    return tuple(found.states) if found is not None else ()


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """The names of the active adapters (() when none, or inside disable_adapters)."""
    found = get_adapters(unwrap(model))
    return found.active if found is not None else ()


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> nn.Module:
    """Activate one adapter, or several (a list), whose effects then add; the others become
    inactive: their layers run as the base layers and their parameters stop requiring grad."""
    wrapper, model = model, unwrap(model)
    found = _require(model, "set_adapter")
    names = (adapter_name,) if isinstance(adapter_name, str) else tuple(adapter_name)
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"set_adapter needs an adapter name or a list of names, got {adapter_name!r}; "
                          f"adapters: {list(found.states)}")
    check_known(found, names, "set_adapter")
    _check_unmerged(model, "set_adapter")
    _check_stackable(model, names)
    activate(model, names)
    return wrapper


def check_known(found: AdapterSet, names: Sequence[str], action: str) -> None:
    """ConfigError unless every name is an adapter of the model, each listed once."""
    unknown = [n for n in names if n not in found.states]
    if unknown:
        raise ConfigError(f"{action}: no adapter named {', '.join(map(repr, unknown))}; "
                          f"adapters: {list(found.states)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{action}: adapter listed twice: {list(names)}")


def _check_stackable(model: nn.Module, names: tuple[str, ...]) -> None:
    """Refuse active layers of two adapters where the outer one computes from the user layer's
    parts (re-runs a block, or a norm's steps) and so would skip the inner one silently."""
    for module in model.modules():
        if not (isinstance(module, AdapterLayer) and module.adapter_name in names
                and (module.reads_wrapped_layer or getattr(module, "runs_block", False))):
            continue
        inner = module.base_layer
        while isinstance(inner, AdapterLayer):
            if inner.adapter_name in names and inner.adapter_name != module.adapter_name:
                raise ConfigError(
                    f"set_adapter: adapters {module.adapter_name!r} ({module.method_name}) and "
                    f"{inner.adapter_name!r} ({inner.method_name}) cannot be active together: "
                    f"{module.method_name} computes from the wrapped layer's own parts, so "
                    f"{inner.adapter_name!r}'s {inner.method_name} would be skipped. Activate them "
                    "one at a time")
            inner = inner.base_layer


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the plain base model inside the block; the active adapters come back on exit, also
    when the block raises."""
    model = unwrap(model)
    found = _require(model, "disable_adapters")
    _check_unmerged(model, "disable_adapters")
    previous = found.active
    activate(model, ())
    try:
        yield model
    finally:
        activate(model, previous)


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove one adapter: its layers, its copies of trained tensors and its record. The other
    adapters are untouched. Deleting the last adapter is unload(model, merge=False)."""
    from .api import unload

    wrapper, model = model, unwrap(model)
    found = _require(model, "delete_adapter")
    if adapter_name not in found.states:
        raise ConfigError(f"delete_adapter: no adapter named {adapter_name!r}; adapters: "
                          f"{list(found.states)}")
    _check_unmerged(model, "delete_adapter")
    if len(found.states) == 1:
        unload(model, merge=False)
        return wrapper
    activate(model, tuple(n for n in found.active if n != adapter_name))
    _remove_layers(model, adapter_name)
    with torch.no_grad():
        for canonical in list(found.banks):
            owners = found.banks[canonical]
            owners.pop(adapter_name, None)
            if not owners:  # nobody trains it any more: the user's tensor, as it was, goes back
                user = found.user.pop(canonical)
                user.copy_(found.originals[canonical])
                if isinstance(user, nn.Parameter):
                    user.requires_grad_(False)
                install(tensor_slots(model)[canonical], user)
                del found.banks[canonical]
                found.base.pop(canonical, None)
    found.frozen_flags.pop(adapter_name, None)
    del found.states[adapter_name]
    return wrapper


# -- what apply calls -------------------------------------------------------------------------
def check_adapter_name(adapter_name: str | None, found: AdapterSet | None) -> str:
    """The adapter an apply call adds to or creates."""
    if adapter_name is None:
        if found is None:
            return DEFAULT
        if len(found.states) == 1:
            return next(iter(found.states))
        if len(found.active) == 1:
            return found.active[0]
        raise ConfigError(f"apply: the model has several adapters ({list(found.states)}) and "
                          f"{'several are' if found.active else 'none is'} active; name the one "
                          "to add to (or a new one) with adapter_name=...")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ConfigError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
    return adapter_name


def register(model: nn.Module, found: AdapterSet, state: PeftState) -> None:
    """Record which user tensors adapter `state` trains, taking the objects now in the model
    (apply ran with only this adapter active, so those are the user's, a base copy, or its own)."""
    slots = tensor_slots(model)
    name = state.adapter_name
    for canonical in owned(model, state):
        owners = found.banks.setdefault(canonical, {})
        if name in owners:
            continue
        obj = slot_tensor(slots[canonical])
        if not owners:
            found.user[canonical] = obj
        if found.base.get(canonical) is obj:
            del found.base[canonical]  # the base copy becomes this adapter's own
        owners[name] = obj


def owned(model: nn.Module, state: PeftState) -> list[str]:
    """Canonical names of the user tensors adapter `state` trains or changes in training."""
    names = list(dict.fromkeys([*state.selected, *state.head]))
    names += [e.canonical for e in iter_buffers(model)
              if e.adapter is None and isinstance(e.module, nn.modules.batchnorm._BatchNorm)]
    return names


@torch.no_grad()
def activate(model: nn.Module, names: tuple[str, ...]) -> None:
    """Make exactly `names` active (no checks: callers check)."""
    found = get_adapters(model)
    for name in found.active:  # deactivate: remember each parameter's flag, then freeze
        if name not in names:
            params = _own_parameters(model, found, name)
            found.frozen_flags[name] = [(p, p.requires_grad) for p in params]
            for p in params:
                p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            module.active = module.adapter_name in names
    slots = tensor_slots(model)
    for canonical, owners in found.banks.items():
        live = [owners[n] for n in names if n in owners]
        if len(live) == 1:
            tensor = live[0]
        elif not live:
            tensor = _base_copy(found, canonical)
        else:
            tensor = _combined(found, canonical, live)
        install(slots[canonical], tensor)
    for name in names:  # reactivate: the flags they had
        if name not in found.active:
            for p, flag in found.frozen_flags.pop(name, ()):
                p.requires_grad_(flag)
    found.active = tuple(names)


# -- helpers -----------------------------------------------------------------------------------
def _require(model: nn.Module, action: str) -> AdapterSet:
    found = get_adapters(model)
    if found is None:
        raise NotAppliedError(f"cannot {action}: no peftvision adapter is on this "
                              f"{type(model).__name__}; call peftvision.apply(model, ...) first")
    return found


def _check_unmerged(model: nn.Module, action: str) -> None:
    if any(isinstance(m, AdapterLayer) and m.merged for m in model.modules()):
        raise MergeError(f"{action}: adapters are merged into the weights; call "
                         "peftvision.unmerge(model) first")


def _own_parameters(model: nn.Module, found: AdapterSet, name: str) -> list[nn.Parameter]:
    params = [e.param for e in iter_parameters(model)
              if e.adapter is not None and e.adapter.adapter_name == name]
    params += [t for owners in found.banks.values() for n, t in owners.items()
               if n == name and isinstance(t, nn.Parameter)]
    return list({id(p): p for p in params}.values())


def _base_copy(found: AdapterSet, canonical: str) -> Tensor:
    """The frozen base tensor; its values are written again each time it is installed, so a
    forward in train mode while disabled (BatchNorm statistics) cannot drift it."""
    original = found.originals.get(canonical)
    if original is None:
        raise ConfigError(f"the base value of {canonical} was not kept (apply(keep_original=False)); "
                          "named adapters and disable_adapters need apply(keep_original=True)")
    base = found.base.get(canonical)
    if base is None:
        base = original.clone()
        owner = next(iter(found.banks[canonical].values()))
        if isinstance(owner, nn.Parameter):
            base = nn.Parameter(base, requires_grad=False)
        found.base[canonical] = base
    else:
        base.copy_(original)
    return base


def _combined(found: AdapterSet, canonical: str, live: list[Tensor]) -> Tensor:
    """base + Σ(copy - base): the adapters' effects add (integers: the first one's value)."""
    base = found.originals[canonical]
    if not base.is_floating_point():
        return live[0].clone()
    total = base.clone()
    for tensor in live:
        total += tensor.detach() - base
    return nn.Parameter(total, requires_grad=False) if isinstance(live[0], nn.Parameter) else total


def tensor_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """canonical name -> (module, attribute, is_parameter) of every user tensor."""
    slots = {e.canonical: (e.module, e.name.rpartition(".")[2], True)
             for e in iter_parameters(model) if e.adapter is None}
    slots.update({e.canonical: (e.module, e.attr, False) for e in iter_buffers(model) if e.adapter is None})
    return slots


def slot_tensor(slot: tuple[nn.Module, str, bool]) -> Tensor:
    module, attr, is_param = slot
    return module._parameters[attr] if is_param else module._buffers[attr]


def install(slot: tuple[nn.Module, str, bool], tensor: Tensor) -> None:
    module, attr, is_param = slot
    (module._parameters if is_param else module._buffers)[attr] = tensor


def _remove_layers(model: nn.Module, name: str) -> None:
    """Replace every layer of adapter `name` by the module it wraps."""
    for module in list(model.modules()):
        for child_name, child in list(module._modules.items()):
            while isinstance(child, AdapterLayer) and child.adapter_name == name:
                child = child.base_layer
            if child is not module._modules[child_name]:
                module._modules[child_name] = child


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, Adapter]]:
    """(canonical name, module) of every module peftvision inserted, nested layers included
    (the layer an AdapterLayer wraps keeps the wrapper's name), outer before inner."""

    def walk(module: nn.Module, canonical: str):
        if isinstance(module, Adapter):
            yield canonical, module
        for cname, child in module._modules.items():
            if child is None:
                continue
            inner = isinstance(module, AdapterLayer) and cname == "base_layer"
            yield from walk(child, canonical if inner else _join(canonical, cname))

    yield from walk(model, "")


# -- one adapter seen alone ------------------------------------------------------------------
class SoloEntry(NamedTuple):
    name: str  # the state-dict name a model with only this adapter would have
    canonical: str  # the name in the user's model
    tensor: Tensor  # this adapter's own copy for a user tensor it trains
    adapter_owned: bool  # held by one of this adapter's modules (else a user tensor)
    module: nn.Module  # the module that holds it in the model


def solo_entries(model: nn.Module, adapter_name: str) -> Iterator[SoloEntry]:
    """Every parameter and persistent buffer as adapter `adapter_name` sees it alone: other
    adapters' layers are looked through, and a user tensor it trains is its own copy. A
    checkpoint keyed by these names loads onto a model with any other adapters."""
    found = get_adapters(model)
    banks = found.banks if found is not None else {}

    def tensors(module: nn.Module):
        yield from ((k, v) for k, v in module._parameters.items() if v is not None)
        yield from ((k, v) for k, v in module._buffers.items()
                    if v is not None and k not in module._non_persistent_buffers_set)

    def walk(module: nn.Module, name: str, canonical: str, inside_adapter: bool):
        if isinstance(module, AdapterLayer) and module.adapter_name != adapter_name:
            yield from walk(module.base_layer, name, canonical, inside_adapter)  # another adapter's
            return
        owned = inside_adapter or isinstance(module, Adapter)
        for tname, tensor in tensors(module):
            key = _join(canonical, tname)
            if not owned:
                tensor = banks.get(key, {}).get(adapter_name, tensor)
            yield SoloEntry(_join(name, tname), key, tensor, owned, module)
        for cname, child in module._modules.items():
            if child is None:
                continue
            if isinstance(module, AdapterLayer) and cname == "base_layer":  # the wrapped layer
                yield from walk(child, _join(name, cname), canonical, inside_adapter)
            else:
                yield from walk(child, _join(name, cname), _join(canonical, cname), owned)

    yield from walk(model, "", "", False)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
