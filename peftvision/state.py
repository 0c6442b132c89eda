"""What peftvision records on a model it changed, and structural views of its parameters."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor, nn

from .errors import NotAppliedError
from .layers import Adapter, AdapterLayer

if TYPE_CHECKING:
    from .methods.base import Method

STATE_ATTR = "_peftvision_state"


class Originals(dict):
    """canonical name -> a copy of a user tensor taken before peftvision let it change (selected
    parameters, the head, buffers such as BatchNorm statistics), so unload(merge=False) writes it
    back bitwise. The copies are never mutated, so copying the state shares them."""

    def __deepcopy__(self, memo) -> Originals:
        return Originals(self)


@dataclass
class PeftState:
    """Everything `apply` did to a model, so later calls need no extra arguments."""

    architecture: str
    base_identity: dict
    original_requires_grad: dict[str, bool]
    train_head: bool = True
    fast_conv_bias: bool = True  # convs with a frozen weight and a trained bias get a fast subclass
    # the applied configs as recorded (ApplyContext.record): what adapter_config.json keeps
    methods: list[Method] = field(default_factory=list)
    # canonical parameter name -> the method that selected it (the first one, if several did)
    selected: dict[str, str] = field(default_factory=dict)
    head: list[str] = field(default_factory=list)
    wrapped: dict[str, list[str]] = field(default_factory=dict)  # method -> canonical module names
    adapter_name: str = "default"
    base_keys: list[str] = field(default_factory=list)  # the user model's state-dict keys
    keep_original: bool = True  # apply(keep_original=...): copies kept for unload(merge=False)
    originals: Originals = field(default_factory=Originals)

    def keep(self, canonical: str, tensor: Tensor) -> None:
        """Copy `tensor` (once) before it can change, when keep_original is on."""
        if self.keep_original and canonical not in self.originals:
            self.originals[canonical] = tensor.detach().clone()


@dataclass
class AdapterSet:
    """The named adapters on one model (see peftvision.named): one PeftState each, which of them
    are active, and, for every user tensor an adapter trains (selected parameters, the head,
    BatchNorm statistics), each owner's own copy. The slot in the model holds the active owner's
    copy, or a frozen copy of the original when no active adapter owns it."""

    states: dict[str, PeftState]  # in the order they were added
    active: tuple[str, ...]
    originals: Originals  # shared by every state: the base values, taken before anything trained
    # canonical tensor name -> adapter name -> the tensor (Parameter or buffer) that adapter trains
    banks: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    user: dict[str, Tensor] = field(default_factory=dict)  # canonical -> the user's own tensor object
    base: dict[str, Tensor] = field(default_factory=dict)  # canonical -> frozen base copy (made lazily)
    # adapter name -> (parameter, requires_grad) as they were when the adapter was deactivated
    frozen_flags: dict[str, list[tuple[nn.Parameter, bool]]] = field(default_factory=dict)

    @property
    def first(self) -> PeftState:
        return next(iter(self.states.values()))


def get_adapters(model: nn.Module) -> AdapterSet | None:
    return getattr(model, STATE_ATTR, None)


def get_state(model: nn.Module, adapter_name: str | None = None) -> PeftState | None:
    """The state of adapter `adapter_name`, or with None the current one: the only adapter, else
    the only active one, else the first active one (require_state refuses that ambiguity)."""
    adapters = get_adapters(model)
    if adapters is None:
        return None
    if adapter_name is not None:
        return adapters.states.get(adapter_name)
    if len(adapters.states) == 1:
        return adapters.first
    return adapters.states[adapters.active[0]] if adapters.active else None


def require_state(model: nn.Module, action: str, adapter_name: str | None = None) -> PeftState:
    adapters = get_adapters(model)
    if adapters is None:
        raise NotAppliedError(f"cannot {action}: no peftvision method was applied to this "
                              f"{type(model).__name__}; call peftvision.apply(model, ...) first")
    if adapter_name is not None:
        if adapter_name not in adapters.states:
            raise NotAppliedError(f"cannot {action}: this model has no adapter named "
                                  f"{adapter_name!r}; its adapters: {list(adapters.states)}")
        return adapters.states[adapter_name]
    if len(adapters.states) > 1 and len(adapters.active) != 1:
        which = f"several adapters are active ({', '.join(adapters.active)})" if adapters.active \
            else "no adapter is active"
        raise NotAppliedError(f"cannot {action}: {which}; name one with adapter_name=... "
                              f"(adapters: {list(adapters.states)})")
    return get_state(model)


class ParamEntry(NamedTuple):
    name: str  # the name in model.named_parameters() now (wrappers included)
    canonical: str  # the name in the user's model without peftvision's wrappers
    param: nn.Parameter
    module: nn.Module  # the module that holds the parameter
    adapter: Adapter | None  # the adapter that owns it, None for the user's own parameters


def iter_parameters(model: nn.Module) -> Iterator[ParamEntry]:
    """Every parameter with its current and canonical names and, structurally, its owner."""

    def walk(module: nn.Module, name: str, canonical: str, adapter: Adapter | None):
        for pname, param in module._parameters.items():
            if param is not None:
                yield ParamEntry(_join(name, pname), _join(canonical, pname), param, module, adapter)
        for cname, child in module._modules.items():
            if child is None:
                continue
            if isinstance(module, AdapterLayer) and cname == "base_layer":
                # the wrapped layer (the user's, or a nested adapter) keeps the wrapper's canonical name
                owner = child if isinstance(child, Adapter) else None
                yield from walk(child, _join(name, cname), canonical, owner)
            elif isinstance(child, Adapter):
                yield from walk(child, _join(name, cname), _join(canonical, cname), child)
            else:
                yield from walk(child, _join(name, cname), _join(canonical, cname), adapter)

    start_adapter = model if isinstance(model, Adapter) else None
    yield from walk(model, "", "", start_adapter)


class BufferEntry(NamedTuple):
    name: str
    canonical: str
    module: nn.Module
    attr: str  # the buffer's attribute name on `module`
    adapter: Adapter | None


def iter_buffers(model: nn.Module) -> Iterator[BufferEntry]:
    """Every persistent buffer with its current and canonical names and its owning adapter."""

    def walk(module: nn.Module, name: str, canonical: str, adapter: Adapter | None):
        for bname, buf in module._buffers.items():
            if buf is not None and bname not in module._non_persistent_buffers_set:
                yield BufferEntry(_join(name, bname), _join(canonical, bname), module, bname, adapter)
        for cname, child in module._modules.items():
            if child is None:
                continue
            if isinstance(module, AdapterLayer) and cname == "base_layer":
                owner = child if isinstance(child, Adapter) else None
                yield from walk(child, _join(name, cname), canonical, owner)
            else:
                owner = child if isinstance(child, Adapter) else adapter
                yield from walk(child, _join(name, cname), _join(canonical, cname), owner)

    yield from walk(model, "", "", model if isinstance(model, Adapter) else None)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
