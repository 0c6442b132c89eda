"""Trainable-parameter report, found structurally (adapter modules, recorded selections, head)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from torch import nn

from .quant import logical_numel
from .state import AdapterSet, get_adapters, iter_parameters


@dataclass
class AdapterSummary:
    """One named adapter of a model with several (Report.adapters)."""

    name: str
    methods: list[str]
    trainable: int  # the parameters it trains when active: its layers and its own head / selected copies
    active: bool
    scale: float = 1.0  # peftvision.set_scale


@dataclass
class Report:
    total: int
    trainable: int
    by_method: dict[str, int] = field(default_factory=dict)
    by_module_type: dict[str, int] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)
    model: str = ""
    # one entry per named adapter when the model has several (empty otherwise); the counts
    # above are the model as it computes now: the active adapters' parameters train
    adapters: list[AdapterSummary] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        d = {**asdict(self), "percent": self.percent}
        if not self.adapters:  # a single adapter reports exactly as before named adapters
            del d["adapters"]
        return d

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
        if self.adapters:
            methods = {a.name: " + ".join(a.methods) for a in self.adapters}
            mwidth = max(len(m) for m in [*methods.values(), "methods"])
            lines += ["", f"{'adapter':<{width}} {'methods':<{mwidth}} {'trainable':>14}  active  scale",
                      *(f"{a.name:<{width}} {methods[a.name]:<{mwidth}} {a.trainable:>14,}  "
                        f"{'yes' if a.active else 'no':<6}  {a.scale:g}" for a in self.adapters)]
        return "\n".join(lines)


def report(model: nn.Module) -> Report:
    """Total and trainable parameters of `model`, per applied method and per module type; with
    several named adapters also one line per adapter (its methods, what it trains, whether it is
    active). The counts are the model as it computes now (the active adapters')."""
    from .wrappers import unwrap

    model = unwrap(model)
    found = get_adapters(model)
    states = [] if found is None else list(found.states.values())
    if len(states) > 1:  # name methods, selections and heads by the active adapters (all if none)
        shown = [s for s in states if s.adapter_name in found.active] or states
    else:
        shown = states
    methods = list(dict.fromkeys(m.name for s in shown for m in s.methods))
    selected = {p: name for s in reversed(shown) for p, name in s.selected.items()}
    head = {h for s in shown for h in s.head}
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
        methods=methods,
        model=type(model).__name__,
        adapters=_adapter_summaries(model, found) if len(states) > 1 else [],
    )


def _adapter_summaries(model: nn.Module, found: AdapterSet) -> list[AdapterSummary]:
    """Per adapter, the parameters it trains: for an active one those that require grad now,
    for an inactive one those that did when it was deactivated (AdapterSet.frozen_flags)."""
    from .named import _own_parameters
    from .scale import get_scale

    summaries = []
    for name, state in found.states.items():
        active = name in found.active
        if active:
            trains = [p for p in _own_parameters(model, found, name) if p.requires_grad]
        else:
            trains = [p for p, flag in found.frozen_flags.get(name, ()) if flag]
        summaries.append(AdapterSummary(name=name, methods=[m.name for m in state.methods],
                                        trainable=sum({id(p): p.numel() for p in trains}.values()),
                                        active=active, scale=get_scale(model, name)))
    return summaries
