"""The method contract: a config dataclass that knows its targets and how to apply itself."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from .. import quant
from ..architectures import GENERIC, Architecture, architectures, get_architecture
from ..errors import ConfigError, UnsupportedArchitectureError, did_you_mean
from ..layers import Adapter, AdapterLayer
from ..state import PeftState
from ..surgery import Journal, get_module, get_submodule_parent, wrap_module
from ..targets import (
    ARCHITECTURES,
    NAMED_SETS,
    TargetSpec,
    check_target_spec,
    find_targets,
    iter_base_modules,
)
from .wrap_checks import attributes_read, check_float_weights, check_parent_access, unwrapped


@dataclass(frozen=True)
class MethodFacts:
    """What a method promises, declared beside it; the generated conformance matrix
    (tests/test_matrix.py) checks each promise on every family the method runs on."""

    identity_at_init: bool = True  # the adapted model starts exactly as the base model
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"": {}})  # label -> options
    # trainable parameters one of its AdapterLayers adds, from the wrapped layer's shape
    params_per_layer: Callable[[Any, AdapterLayer], int] | None = None
    needs_data: bool = False  # chooses from data at apply time (SH-PEFT, SPT)


@dataclass
class Method:
    """Base of every method config. Subclasses are dataclasses registered by name."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = "selective"  # "selective" (chooses parameters) or "additive" (adds modules)
    mergeable: ClassVar[bool] = True
    # "generic" here: runs on any model (with explicit targets where no placement exists)
    architectures: ClassVar[tuple[str, ...]] = ARCHITECTURES
    # placed methods take their default targets from the architecture registry (`placements`);
    # the others run on the whole model (bias, norm, SV-Diff...) where the family has `needs`
    placed: ClassVar[bool] = False
    needs: ClassVar[str | None] = None  # a trait of the family, e.g. "batchnorm"
    placed_where: ClassVar[str] = ""  # where a placed method goes, said when a family has no placement
    placement_of: ClassVar[str] = ""  # share another method's default placements (e.g. "lora")
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # counts its papers print (registry.ReportedCount); read from the class itself, not inherited
    reported: ClassVar[tuple] = ()
    test_facts: ClassVar[MethodFacts] = MethodFacts()

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
        spec = ctx.placement(self)
        if spec is None:
            reason = ctx.arch.refusals.get(self.placement_name(), "no default placement on this family")
            raise ctx.refusal(self, (
                f" with no targets ({reason}). Pass targets=[...] "
                f"({self.targets_hint}) or a named set ({', '.join(repr(n) for n in NAMED_SETS)}); "
                f"modules of this model include: {ctx.example_names()}"))
        return spec

    @classmethod
    def runs_on(cls, arch: Architecture) -> bool:
        """Whether this method applies with no targets to a model of family `arch`."""
        if cls.placement_name() in arch.placements or arch.name in cls.presets:
            return True
        if cls.placed or arch.name == GENERIC:
            return False
        generic = GENERIC in cls.architectures or arch.name in cls.architectures
        return generic and (cls.needs is None or cls.needs in arch.traits)

    @classmethod
    def placement_name(cls) -> str:
        """The method whose default placements this one uses (itself unless `placement_of`)."""
        return cls.placement_of or cls.name

    def target_spec(self, ctx: ApplyContext) -> TargetSpec:
        """The user's targets, else the preset for the model's architecture."""
        targets = getattr(self, "targets", None)
        return targets if targets is not None else self.default_targets(ctx)

    def quantized_refusal(self) -> str:
        """Why this config cannot wrap a bitsandbytes (quantized) layer, or '' when it can."""
        return f"{self.name} computes with the layer's weight, which is quantized"

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
        from ..method_counts import COUNTS, MODELS, REPORTED
        from ..registry import MethodInfo

        families = tuple(name for name, arch in architectures().items() if cls.runs_on(arch))
        generic = (GENERIC,) if GENERIC in cls.architectures else ()
        ours = dict(zip(MODELS, REPORTED.get(cls.name, ())))
        reported = tuple(dataclasses.replace(r, ours=ours.get(r.model))
                         for r in cls.__dict__.get("reported", ()))  # DoRA does not inherit LoRA's
        counts = tuple(zip(MODELS, COUNTS[cls.name])) if cls.name in COUNTS else ()
        return MethodInfo(cls.name, cls.aliases, cls.kind, cls.mergeable, families + generic,
                          cls.summary, cls.paper, counts, reported)


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

    @property
    def arch(self) -> Architecture:
        return get_architecture(self.architecture)

    def placement(self, method: Method) -> TargetSpec:
        """`method`'s default targets on this model's family (None: it has none)."""
        spec = self.arch.placement(method.placement_name(), self.model)
        return spec if spec is not None else method.presets.get(self.architecture)

    def read_by_parent(self, name: str) -> frozenset[str]:
        """Attributes (other than forward) of module `name` that its parent's forward reads."""
        parent, child = get_submodule_parent(self.model, name)
        return frozenset(attributes_read(type(unwrapped(parent))).get(child, ())) - {"forward"}

    def example_names(self, count: int = 8) -> str:
        """Real module names of the model, to show in an error (layers with weights first)."""
        names = [n for n, m in iter_base_modules(self.model)
                 if n and isinstance(getattr(m, "weight", None), nn.Parameter)]
        return ", ".join(names[:count]) or "(none with weights)"

    def require_architecture(self, method: Method, supported: Iterable[str] | None = None) -> None:
        """Refuse a method this model's family does not support (checked once, by apply)."""
        arch = self.arch
        if supported is not None:
            ok = self.architecture in tuple(supported)
        else:
            explicit = getattr(method, "targets", None) is not None
            ok = (type(method).runs_on(arch)
                  or (GENERIC in method.architectures and (explicit or arch.name == GENERIC
                                                            or method.placed and hasattr(method, "targets"))))
        if not ok:
            reason = arch.refusals.get(method.placement_name()) or method.placed_where or _written_for(method)
            why = (f": {reason}" if reason else f" (it needs a family with {method.needs!r})" if method.needs
                   else " (no placement on this family)")
            raise self.refusal(method, why)

    def refusal(self, method: Method, why: str) -> UnsupportedArchitectureError:
        supported = type(method).info().architectures
        return UnsupportedArchitectureError(
            f"method {method.name!r} does not support {type(self.model).__name__} (architecture "
            f"{self.architecture!r}){why}; it supports: {', '.join(supported) or 'none'}"
            + (" (generic: any model, with explicit targets)" if GENERIC in supported else ""))

    def find(self, method: Method, spec: TargetSpec, allowed=(nn.Module,), exclude_head=True):
        exclude = sorted(self.head_modules) if exclude_head else ()
        return find_targets(self.model, spec, method=method.name, allowed=allowed, exclude=exclude)

    def select(self, method: Method, params: Iterable[tuple[str, nn.Parameter]]) -> int:
        """Make these existing (canonical name, parameter) pairs trainable for `method`."""
        count = 0
        for canonical, param in params:
            if not param.is_floating_point():  # requires_grad_ would be a raw torch error
                module = get_module(self.model, canonical.rpartition(".")[0]) if "." in canonical else self.model
                raise UnsupportedArchitectureError(quant.refusal(
                    method.name, canonical, unwrapped(module),
                    f"{canonical} is {param.dtype}, which cannot train"))
            self.state.keep(canonical, param)  # before training changes it (unload restores it)
            param.requires_grad_(True)
            if canonical not in self.state.selected:  # selected by two methods: counted once
                self.state.selected[canonical] = method.name
                count += param.numel()
        return count

    def wrap(self, method: Method, name: str, factory: Callable[[nn.Module], AdapterLayer],
             innermost: bool = False) -> AdapterLayer:
        check_float_weights(method, name, get_module(self.model, name))
        layer = wrap_module(self.model, name, factory, self.journal, innermost, self.state.adapter_name)
        layer.method_name = method.name
        for part in _own_modules(layer):  # the layer and the adapter modules it inserts
            if isinstance(part, Adapter):
                part.adapter_name = self.state.adapter_name
        parent, child = get_submodule_parent(self.model, name)
        check_parent_access(method, name, unwrapped(parent), child, layer)
        wrapped = self.state.wrapped.setdefault(method.name, [])
        if name not in wrapped:
            wrapped.append(name)
        return layer

    def record(self, method: Method, config: Method) -> None:
        """Record what `method` decided that its config did not say (e.g. a data-chosen
        selection) as `config`: the value saved in adapter_config.json, which rebuilds the same
        layers. The user's config object is never changed."""
        self.recorded[method.name] = config


def _written_for(method: Method) -> str:
    """"it is written for timm VisionTransformer and its variants ('vit'), ..." for a method that
    names the families whose block layout it knows; '' for the others."""
    if method.placed or GENERIC in method.architectures or not method.architectures:
        return ""
    known = [(a, architectures().get(a)) for a in method.architectures]
    return "it is written for " + ", ".join(
        f"{arch.description.split(':')[0].split(' (')[0] if arch else a} ({a!r})" for a, arch in known)


def _own_modules(layer: AdapterLayer):
    """`layer` and its submodules, without the layer it wraps."""
    yield layer
    for name, child in layer.named_children():
        if name != "base_layer":
            yield from child.modules()


def parameters_under(prefix: str, module: nn.Module, recurse: bool = True):
    """(canonical name, parameter) pairs of a user module (adapters inside it skipped)."""
    from ..state import iter_parameters

    for entry in iter_parameters(module):
        if entry.adapter is None and (recurse or entry.module is module):
            yield (f"{prefix}.{entry.canonical}" if prefix else entry.canonical), entry.param
