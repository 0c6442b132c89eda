"""The method contract: a config dataclass that knows its targets and how to apply itself."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..errors import ConfigError, UnsupportedArchitectureError, did_you_mean
from ..layers import AdapterLayer
from ..state import PeftState
from ..surgery import Journal, wrap_module
from ..targets import ARCHITECTURES, TargetSpec, check_target_spec, find_targets


@dataclass
class Method:
    """Base of every method config. Subclasses are dataclasses registered by name."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = "selective"  # "selective" (chooses parameters) or "additive" (adds modules)
    mergeable: ClassVar[bool] = True
    architectures: ClassVar[tuple[str, ...]] = ARCHITECTURES
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_frozen", True)  # before validate: validate only checks
        if hasattr(self, "targets"):
            check_target_spec(self.name, self.targets)
        self.validate()

    # A config is a value: frozen once built (as a frozen dataclass, but subclasses declared with
    # plain @dataclass stay valid). apply records what it decides on the model, never here.
    def __setattr__(self, field: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise dataclasses.FrozenInstanceError(
                f"{self.name} configs are immutable values; make a changed copy with "
                f"dataclasses.replace(config, {field}=...)")
        object.__setattr__(self, field, value)

    def __delattr__(self, field: str) -> None:
        raise dataclasses.FrozenInstanceError(f"{self.name} configs are immutable values")

    def validate(self) -> None:
        """Raise ConfigError for invalid values (never change them: the config is frozen)."""

    # default targets per architecture; a missing architecture needs explicit targets
    presets: ClassVar[dict[str, TargetSpec]] = {}
    targets_hint: ClassVar[str] = "module names, a regex, or module types"

    def apply_to(self, ctx: ApplyContext) -> None:
        raise NotImplementedError

    def default_targets(self, ctx: ApplyContext) -> TargetSpec:
        if ctx.architecture not in self.presets:
            raise UnsupportedArchitectureError(
                f"{self.name} on a {ctx.architecture} model needs targets=[...] ({self.targets_hint})")
        return self.presets[ctx.architecture]

    def target_spec(self, ctx: ApplyContext) -> TargetSpec:
        """The user's targets, else the preset for the model's architecture."""
        targets = getattr(self, "targets", None)
        return targets if targets is not None else self.default_targets(ctx)

    def remove_from(self, model: nn.Module) -> None:
        """Undo changes other than wrappers and selections (inserted modules); called by unload."""

    def details(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific facts about what apply did to `model`, for peftvision.applied."""
        return {}

    # -- serialisation for adapter_config.json -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Method:
        return make_config(cls, **{k: _decode(v) for k, v in values.items()})

    @classmethod
    def info(cls):
        from ..registry import MethodInfo

        return MethodInfo(cls.name, cls.aliases, cls.kind, cls.mergeable, cls.architectures,
                          cls.summary, cls.paper)


def positive_int(method: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{method}: {field} must be a positive integer, got {value!r}")
    return value


def number_in(method: str, field: str, value: Any, low: float, high: float, *,
              high_open: bool = False, low_open: bool = False) -> float:
    """A real number in [low, high] (ends excluded where *_open); raises ConfigError otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{method}: {field} must be a number in {interval}, got {value!r}")
    return float(value)


def make_config(cls: type[Method], **cfg: Any) -> Method:
    """Build a config, turning unknown keyword arguments into a ConfigError that lists the valid ones."""
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - valid)
    if unknown:
        hints = "; ".join(h for h in (_option_hint(name, valid) for name in unknown) if h)
        raise ConfigError(f"{cls.name}: unknown option(s) {', '.join(unknown)}"
                          f"{f' ({hints})' if hints else ''}; "
                          f"valid options: {', '.join(sorted(valid)) or 'none'}")
    return cls(**cfg)


# Option names users bring from huggingface/peft's LoraConfig, and ours.
PEFT_SPELLINGS = {"lora_alpha": "alpha", "target_modules": "targets", "lora_dropout": "dropout",
                  "rank": "r"}


def _option_hint(name: str, valid: set[str]) -> str:
    """"lora_alpha: peft's name for 'alpha'", "dropuot: did you mean 'dropout'?" or ""."""
    ours = PEFT_SPELLINGS.get(name)
    if ours in valid:
        return f"{name}: peft's name for {ours!r}"
    close = did_you_mean(name, sorted(valid))
    return f"{name}: {close.strip(' ()')}" if close else ""


def _encode(value: Any) -> Any:
    if isinstance(value, type):
        return {"type": f"{value.__module__}.{value.__qualname__}"}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"type"}:
        # Resolve module types only from modules already imported (the model's own classes are):
        # a config file must never make us import, and so run, arbitrary code.
        module_name, _, qualname = str(value["type"]).rpartition(".")
        cls = getattr(sys.modules.get(module_name), qualname, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(f"targets name the module type {value['type']!r}, which is not an "
                              "imported nn.Module class; import the package that defines it first")
        return cls
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


class ApplyContext:
    """What a method sees while applying itself: the model, its architecture, and the two ways
    to change it (select existing parameters, wrap a module). Every change is journaled."""

    def __init__(self, model: nn.Module, state: PeftState, journal: Journal, head: set[str]):
        self.model = model
        self.state = state
        self.architecture = state.architecture
        self.journal = journal
        self.head_modules = head  # canonical names of the classifier head modules
        self.recorded: dict[str, Method] = {}  # method name -> the config that rebuilds its decisions

    def require_architecture(self, method: Method, supported: Iterable[str] | None = None) -> None:
        supported = tuple(supported or method.architectures)
        if self.architecture not in supported:
            raise UnsupportedArchitectureError(
                f"method {method.name!r} does not support {type(self.model).__name__} "
                f"(architecture {self.architecture!r}); it supports: {', '.join(supported)}")

    def find(self, method: Method, spec: TargetSpec, allowed=(nn.Module,), exclude_head=True):
        exclude = sorted(self.head_modules) if exclude_head else ()
        return find_targets(self.model, spec, method=method.name, allowed=allowed, exclude=exclude)

    def select(self, method: Method, params: Iterable[tuple[str, nn.Parameter]]) -> int:
        """Make these existing (canonical name, parameter) pairs trainable for `method`."""
        count = 0
        for canonical, param in params:
            self.state.keep(canonical, param)  # before training changes it (unload restores it)
            param.requires_grad_(True)
            if canonical not in self.state.selected:  # selected by two methods: counted once
                self.state.selected[canonical] = method.name
                count += param.numel()
        return count

    def wrap(self, method: Method, name: str, factory: Callable[[nn.Module], AdapterLayer],
             innermost: bool = False) -> AdapterLayer:
        layer = wrap_module(self.model, name, factory, self.journal, innermost)
        layer.method_name = method.name
        wrapped = self.state.wrapped.setdefault(method.name, [])
        if name not in wrapped:
            wrapped.append(name)
        return layer

    def record(self, method: Method, config: Method) -> None:
        """Record what `method` decided that its config did not say (e.g. a data-chosen
        selection) as `config`: the value saved in adapter_config.json, which rebuilds the same
        layers. The user's config object is never changed."""
        self.recorded[method.name] = config


def parameters_under(prefix: str, module: nn.Module, recurse: bool = True):
    """(canonical name, parameter) pairs of a user module (adapters inside it skipped)."""
    from ..state import iter_parameters

    for entry in iter_parameters(module):
        if entry.adapter is None and (recurse or entry.module is module):
            yield (f"{prefix}.{entry.canonical}" if prefix else entry.canonical), entry.param
