"""Per-sample routing of the user tensors adapters keep their own copies of (named.py's banks:
a head, selected parameters, BatchNorm statistics), for peftvision.routing.

A user module holding such tensors runs once per group of samples whose copies differ, with that
group's copies installed for its whole subtree: a parent may read a child's tensor itself (timm
EVA's attention runs F.linear on qkv.weight), so grouping by the subtree's tensors keeps what it
reads right. Modules whose copies are equal for every sample of the batch (LoRA adapters on a
ResNet keep equal, untouched BatchNorm statistics) get them installed once and are not split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .named import _base_copy, tensor_slots
from .state import AdapterSet

if TYPE_CHECKING:
    from .routing import Router

_MISSING = object()


class Banks:
    """The banked tensors as the batch's names see them, and the modules routed for them."""

    def __init__(self, model: nn.Module, found: AdapterSet, names: tuple) -> None:
        self.slots = tensor_slots(model)
        unique = list(dict.fromkeys(names))
        self.value = {}  # (canonical, name) -> the tensor that name computes with
        for canonical, owners in found.banks.items():
            for name in unique:
                own = owners.get(name) if name is not None else None
                self.value[canonical, name] = _base_copy(found, canonical) if own is None else own
        self.entry = {c: _installed(self.slots[c]) for c in found.banks}  # restored on exit
        self.owners: dict[nn.Module, list[str]] = {}  # module -> canonicals it holds
        for canonical in found.banks:
            self.owners.setdefault(self.slots[canonical][0], []).append(canonical)
        self.names = unique
        self._under: dict[int, list[str]] = {}
        self.calls: dict[nn.Module, int] = {}  # split modules -> forwards run this model call

    def under(self, module: nn.Module) -> list[str]:
        """Canonical names of the banked tensors in `module`'s subtree (cached)."""
        key = id(module)
        if key not in self._under:
            self._under[key] = [c for m in module.modules() for c in self.owners.get(m, ())]
        return self._under[key]

    def groups(self, canonicals: list[str]) -> list[list]:
        """The batch's names grouped by bit-equal values of `canonicals`."""
        groups: list[list] = []
        for name in self.names:
            for members in groups:
                if all(_same(self.value[c, members[0]], self.value[c, name]) for c in canonicals):
                    members.append(name)
                    break
            else:
                groups.append([name])
        return groups

    @contextmanager
    def installed(self, canonicals: list[str], name: str | None) -> Iterator[None]:
        """`name`'s values in `canonicals`' slots for the block, then what they held before."""
        if not canonicals:
            yield
            return
        slots = [self.slots[c] for c in canonicals]
        before = [_installed(s) for s in slots]
        _install_all(slots, [self.value[c, name] for c in canonicals])
        try:
            yield
        finally:
            _install_all(slots, before)

    def route(self, router: Router) -> list[Callable[[], None]]:
        """Install or split every module holding banked tensors; returns the undo steps."""
        undo: list[Callable[[], None]] = [self._restore_entry]
        for module in self.owners:
            canonicals = self.under(module)
            groups = self.groups(canonicals)
            if len(groups) == 1:  # equal for every sample: install once
                _install_all([self.slots[c] for c in canonicals], [self.value[c, groups[0][0]] for c in canonicals])
            else:
                undo.append(self._split(module, canonicals, groups, router))
        return undo

    def check_used(self) -> None:
        """After a model call: a split module that never ran had its tensors read by a parent
        that computes with them itself, which per-sample routing cannot serve."""
        skipped = [m for m, n in self.calls.items() if n == 0]
        if skipped:
            canonicals = ", ".join(self.owners[skipped[0]])
            raise ConfigError(
                f"adapter_per_sample: the per-adapter copies of {canonicals} differ between the "
                f"batch's adapters, but that {type(skipped[0]).__name__} never ran: its parent reads "
                "them itself (e.g. timm EVA/BEiT attention reads qkv.weight), so one batch cannot "
                "mix those adapters. Run their samples in separate batches")

    def reset_calls(self) -> None:
        for module in self.calls:
            self.calls[module] = 0

    def _restore_entry(self) -> None:
        _install_all([self.slots[c] for c in self.entry], list(self.entry.values()))

    def _split(self, module: nn.Module, canonicals: list[str], groups: list[list], router: Router) -> Callable:
        """Replace `module.forward` (an instance attribute, removed on exit) by one that runs each
        group of samples with that group's values installed in the module's subtree."""
        own = module.__dict__.get("forward", _MISSING)
        original = module.forward
        label = f"{type(module).__name__} with per-adapter tensors ({', '.join(self.owners[module])})"
        group_of = {name: i for i, members in enumerate(groups) for name in members}
        self.calls[module] = 0

        def run_as(name: str | None) -> Callable:
            def call(*args, **kwargs):
                with self.installed(canonicals, name):
                    return original(*args, **kwargs)
            return call

        def routed(*args, **kwargs) -> Any:
            self.calls[module] += 1
            names = router.names
            runs = [([i for i, n in enumerate(names) if group_of[n] == g], run_as(members[0]))
                    for g, members in enumerate(groups)]
            runs = [run for run in runs if run[0]]
            if len(runs) == 1:
                return runs[0][1](*args, **kwargs)
            k = router.rows_per_sample(_first_tensor(args, kwargs), label)
            return router.split(runs, args, kwargs, k, label)

        module.forward = routed

        def undo() -> None:
            if own is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
        return undo


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


def _installed(slot: tuple) -> Tensor:
    module, attr, is_param = slot
    return module._parameters[attr] if is_param else module._buffers[attr]


def _install_all(slots: list, tensors: list) -> None:
    for (module, attr, is_param), tensor in zip(slots, tensors):
        (module._parameters if is_param else module._buffers)[attr] = tensor


def _same(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))
