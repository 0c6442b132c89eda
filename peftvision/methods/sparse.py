"""The config shared by the data-selected sparse methods (SH-PEFT, SPT).

Read with: sparse_layers.py (the deltas that train), sparse_importance.py (gradients over the
data), sparse_selection.py (scope, global top-k, wrapping).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import ConfigError
from ..state import iter_buffers
from ..targets import ARCHITECTURES, TargetSpec, check_target_spec
from .base import ApplyContext, Method, MethodFacts, number_in, positive_int
from .sparse_layers import SparseDeltaLayer
from .sparse_selection import ScopeEntry, recorded_selection, scope_entries, wrap_sparse

DEFAULT_FRACTION = 0.01


@dataclass
class SparseMethod(Method):
    """Fields shared by data-selected sparse methods. `data` and `loss_fn` are runtime-only:
    apply reads them and records, on the model, this config with `selection` (tensor -> count)
    in their place: what adapter_config.json keeps (peftvision.applied(model) shows it); the
    chosen indices themselves are adapter tensors."""

    data: Iterable | None = None  # (inputs, targets) batches; inputs a tensor, tuple or dict
    fraction: float | None = None  # share of the scope's entries to choose; default 0.01
    count: int | None = None  # or an exact number of entries
    batches: int | None = None  # None: one pass over `data`
    loss_fn: Callable | None = None  # loss_fn(model_output, targets); default cross-entropy
    scope: TargetSpec = None  # modules whose tensors may be chosen; None: the whole backbone
    selection: dict[str, int] | None = None  # a recorded choice: canonical tensor name -> count

    kind: ClassVar[str] = "additive"
    architectures: ClassVar = ARCHITECTURES
    runtime_fields: ClassVar[tuple[str, ...]] = ("data", "loss_fn")
    test_facts: ClassVar = MethodFacts(needs_data=True)  # tests/test_sparse_methods.py

    def validate(self) -> None:
        if self.fraction is not None and self.count is not None:
            raise ConfigError(f"{self.name}: give fraction= or count=, not both")
        if self.fraction is not None:
            number_in(self.name, "fraction", self.fraction, 0, 1, low_open=True)
        if self.count is not None:
            positive_int(self.name, "count", self.count)
        if self.batches is not None:
            positive_int(self.name, "batches", self.batches)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ConfigError(f"{self.name}: loss_fn must be callable as loss_fn(output, targets)")
        if self.data is not None:
            if isinstance(self.data, (Tensor, str, bytes)) or not hasattr(self.data, "__iter__"):
                raise ConfigError(f"{self.name}: data must be an iterable of (inputs, targets) "
                                  f"batches such as a DataLoader, got {type(self.data).__name__}")
            if self.selection is not None:
                raise ConfigError(f"{self.name}: give data= (to choose the entries) or a recorded "
                                  "selection, not both")
        if self.selection is not None and not (
                isinstance(self.selection, dict)
                and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                        for k, v in self.selection.items())):
            raise ConfigError(f"{self.name}: selection must map tensor names to counts")
        check_target_spec(self.name, self.scope)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if k not in self.runtime_fields}

    def budget(self, total: int) -> int:
        """k: `count`, or round(fraction·total) (at least 1) of the scope's `total` entries."""
        if self.count is not None:
            if self.count > total:
                raise ConfigError(f"{self.name}: count={self.count} exceeds the {total} entries in scope")
            return self.count
        fraction = DEFAULT_FRACTION if self.fraction is None else self.fraction
        return min(total, max(1, round(fraction * total)))

    # -- apply: subclasses implement choose() -----------------------------------------------
    def choose(self, ctx: ApplyContext, entries: list[ScopeEntry]) -> tuple[dict[str, Tensor], list[str]]:
        """From `self.data`: ({tensor: sorted flat indices}, [modules that get LoRA])."""
        raise NotImplementedError

    def recorded_lora(self) -> list[str]:
        return []

    def wrap_lora(self, ctx: ApplyContext, module: str) -> None:
        raise NotImplementedError

    def recorded(self, sparse: dict[str, Tensor], lora: list[str]) -> dict[str, Any]:
        """The config fields that record a choice, so the recorded config rebuilds it."""
        return {"selection": {name: int(idx.numel()) for name, idx in sparse.items()}}

    def apply_to(self, ctx: ApplyContext) -> None:
        entries = scope_entries(ctx, self)
        if self.selection is not None:  # a recorded selection (load_adapter): no data needed
            sparse, lora = recorded_selection(self, entries), self.recorded_lora()
        else:
            if self.data is None:
                raise ConfigError(f"{self.name} chooses its weights from data: pass "
                                  f"data=<iterable of (inputs, targets)>, e.g. a DataLoader")
            if self.loss_fn is None and "diffusers" in ctx.arch.traits:
                raise ConfigError(f"{self.name} on a diffusion model needs loss_fn=(output, targets) -> loss")
            sparse, lora = self.choose(ctx, entries)
            # the model's record keeps the choice, without the data; this config stays as it was
            runtime = dict.fromkeys(self.runtime_fields)
            ctx.record(self, dataclasses.replace(self, **runtime, **self.recorded(sparse, lora)))
        wrap_sparse(ctx, self, entries, sparse)
        for module in lora:
            self.wrap_lora(ctx, module)

    def details(self, model: nn.Module) -> dict[str, Any]:
        """{"indices": {tensor: its chosen flat indices (k,), a copy}}, read from the live layers
        (so after load_adapter they are the loaded ones)."""
        indices = {}
        for entry in iter_buffers(model):
            layer = entry.adapter
            if (isinstance(layer, SparseDeltaLayer) and layer.method_name == self.name
                    and entry.attr.startswith("indices_")):
                module = entry.canonical.rpartition(".")[0]
                tensor = entry.attr[len("indices_"):]
                indices[f"{module}.{tensor}" if module else tensor] = getattr(layer, entry.attr).detach().clone()
        return {"indices": indices}
