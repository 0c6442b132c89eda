"""What `apply` decided, as a read-only record: peftvision.applied(model).

Configs are values that apply never changes; what apply chose (data-selected weights, LoRA
placements, wrapped modules, the trainable head) lives on the model, and this is the one public
way to read it. Each call returns a fresh snapshot: changing it cannot change the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from torch import nn

from .state import get_adapters, require_state
from .wrappers import unwrap

if TYPE_CHECKING:
    from .methods.base import Method


@dataclass(frozen=True)
class MethodRecord:
    """One applied method."""

    name: str
    # the config as recorded: the user's, with what apply chose in place of runtime-only inputs
    # (SH-PEFT/SPT: `selection` and `lora_modules` instead of `data`); adapter_config.json keeps it
    config: Method
    selected: tuple[str, ...]  # canonical names of the existing parameters it made trainable
    wrapped: tuple[str, ...]  # canonical names of the modules it wrapped
    details: Mapping[str, Any]  # method-specific facts, e.g. SH-PEFT/SPT's chosen "indices"


@dataclass(frozen=True)
class AppliedRecord:
    """Everything peftvision applied to one model."""

    adapter_name: str
    architecture: str
    base_model: Mapping[str, Any]  # the base model's identity (class, name, fingerprint)
    train_head: bool
    fast_conv_bias: bool  # apply(..., fast_conv_bias=): whether convs may get the bias fast path
    keep_original: bool  # apply(..., keep_original=): whether unload(merge=False) restores bitwise
    head: tuple[str, ...]  # canonical names of the head parameters trained whole
    methods: tuple[MethodRecord, ...]  # in the order they were applied

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.methods)

    def method(self, name: str) -> MethodRecord:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"{name!r} was not applied to this model; applied: {list(self.names)}")


def applied(model: nn.Module, adapter_name: str | None = None) -> AppliedRecord | None:
    """The record of what peftvision applied to `model` (seen through torch.compile and
    (Distributed)DataParallel wrappers) as adapter `adapter_name` (None: the only adapter, or the
    only active one), or None when nothing is applied."""
    model = unwrap(model)
    if get_adapters(model) is None:
        return None
    state = require_state(model, "read the record", adapter_name)
    methods = tuple(
        MethodRecord(
            name=cfg.name,
            config=cfg,
            selected=tuple(p for p, owner in state.selected.items() if owner == cfg.name),
            wrapped=tuple(state.wrapped.get(cfg.name, ())),
            details=MappingProxyType(cfg.details(model)),
        )
        for cfg in state.methods)
    return AppliedRecord(
        adapter_name=state.adapter_name,
        architecture=state.architecture,
        base_model=MappingProxyType(dict(state.base_identity)),
        train_head=state.train_head,
        fast_conv_bias=state.fast_conv_bias,
        keep_original=state.keep_original,
        head=tuple(state.head),
        methods=methods,
    )
