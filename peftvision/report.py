"""Trainable-parameter report, found structurally (adapter modules, recorded selections, head)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from torch import nn

from .quant import logical_numel
from .record import applied
from .state import iter_parameters


@dataclass
class Report:
    total: int
    trainable: int
    by_method: dict[str, int] = field(default_factory=dict)
    by_module_type: dict[str, int] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)
    model: str = ""

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "percent": self.percent}

    def __str__(self) -> str:
        width = max([len(k) for k in (*self.by_method, *self.by_module_type)] + [22])
        lines = [
            f"{self.model} with {' + '.join(self.methods) or 'no method'}",
            f"{'trainable parameters':<{width}} {self.trainable:>14,}  ({self.percent:.4f}% of {self.total:,})",
            "",
            f"{'by method':<{width}} {'parameters':>14}",
            *(f"{k:<{width}} {v:>14,}" for k, v in self.by_method.items()),
            "",
            f"{'by module type':<{width}} {'parameters':>14}",
            *(f"{k:<{width}} {v:>14,}" for k, v in self.by_module_type.items()),
        ]
        return "\n".join(lines)


def report(model: nn.Module) -> Report:
    """Total and trainable parameters of `model`, per applied method and per module type."""
    from .wrappers import unwrap

    model = unwrap(model)
    record = applied(model)
    methods = record.methods if record else ()
    selected = {p: m.name for m in methods for p in m.selected}
    head = set(record.head) if record else set()
    seen: set[int] = set()
    total = trainable = 0
    by_method: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    for entry in iter_parameters(model):
        if id(entry.param) in seen:  # tied weights count once
            continue
        seen.add(id(entry.param))
        n = logical_numel(entry.param)  # a packed 4-bit weight counts its weights, not bytes
        total += n
        if not entry.param.requires_grad:
            continue
        trainable += n
        if entry.adapter is not None:
            by_method[entry.adapter.method_name or type(entry.adapter).__name__] += n
            by_type[type(entry.adapter).__name__] += n
            continue
        if entry.canonical in head:
            by_method["head"] += n
        else:
            by_method[selected.get(entry.canonical, "other (trainable, not from a method)")] += n
        by_type[type(entry.module).__name__] += n
    return Report(
        total=total,
        trainable=trainable,
        by_method=dict(by_method.most_common()),
        by_module_type=dict(by_type.most_common()),
        methods=[m.name for m in methods],
        model=type(model).__name__,
    )
