"""Per-sample adapter routing: one forward pass where each sample uses its own adapter.

`with adapter_per_sample(model, ["a", "b", None, "a"]): y = model(x)` gives, row by row, what
running each sample alone with that adapter active (None: the base model) gives.

How: every adapter layer of a named adapter gets a `route` (layers.py's `_gate` calls it). The
router splits the batch at that layer: the samples of the layer's adapter run its adapted forward,
the others its base layer, and the outputs are put back in batch order. An additive layer (one
with `output_delta`: the LoRA family, LoHa, LoKr, TSA) runs its base once on the whole batch and
its delta on its own samples only (index_select / index_add). A user module whose tensors an
adapter keeps its own copy of (a head, selected parameters, BatchNorm statistics: named.py's
banks) runs once per group of samples whose copies differ (routing_banks.py).
Sub-batches carry their own list of names, so nested adapters (a's layer around b's) route
correctly, as do layers that see windows or heads folded into the batch: a leading dimension of
k·B rows is taken as k consecutive rows per sample (batch-major, as timm's window partition).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .layers import AdapterLayer
from .named import _check_unmerged, _require
from .routing_banks import Banks, _first_tensor
from .state import AdapterSet
from .wrappers import unwrap


@contextmanager
def adapter_per_sample(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, sample i of the batch goes through adapter `names[i]` (None: the base
    model) in one forward pass. Everything is restored on exit, also when the block raises.

    Refused with a clear error: merged adapters, BatchNorm in train mode (its batch statistics
    couple the samples), VPT unless every sample uses a VPT adapter with the same prompts, and a
    parent that reads an adapted layer's `.weight` itself (EVA/BEiT's qkv) on a mixed batch."""
    wrapper, model = model, unwrap(model)
    found = _require(model, "adapter_per_sample")
    names = _check_names(found, names)
    _check_unmerged(model, "adapter_per_sample")
    _check_batchnorm(model)
    _check_prompts(model, names)
    used = set(names) - {None}
    if any(isinstance(m, AdapterLayer) and m.route is not None for m in model.modules()):
        raise ConfigError("adapter_per_sample: this model is already routed (nested "
                          "adapter_per_sample blocks on one model); leave the outer block first")
    router = Router(tuple(names))
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    was_active = [m.active for m in layers]
    restore: list[Callable[[], None]] = []
    try:
        for layer in layers:
            layer.active = layer.adapter_name in used
            if layer.active:
                layer.route = router
        router.banks = Banks(model, found, router.names)
        restore += router.banks.route(router)
        for hook in (model.register_forward_pre_hook(router.before_model, with_kwargs=True),
                     model.register_forward_hook(router.after_model)):
            restore.append(hook.remove)
        yield wrapper
    finally:
        for undo in reversed(restore):
            undo()
        for layer, active in zip(layers, was_active):
            layer.__dict__.pop("route", None)
            layer.active = active


class Router:
    """Routes one batch: a stack of name lists, one per (sub-)batch being computed."""

    def __init__(self, names: tuple[str | None, ...]) -> None:
        self.stack = [names]
        self.banks: Banks | None = None  # the per-adapter user tensors (routing_banks.py)
        self._samples: dict[tuple, list[int]] = {}
        self._rows: dict[tuple, Tensor] = {}

    # -- the batch -------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str | None, ...]:
        return self.stack[-1]

    def before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the model: the names list must match the batch it is called on."""
        x = _first_tensor(args, kwargs)
        if x is not None and len(self.stack) == 1 and x.dim() and x.shape[0] != len(self.names):
            raise ConfigError(f"adapter_per_sample got {len(self.names)} adapter names for a batch of "
                              f"{x.shape[0]} samples; give one name (or None) per sample")
        if len(self.stack) == 1:
            self.banks.reset_calls()

    def after_model(self, module: nn.Module, args: tuple, out: Any) -> None:
        if len(self.stack) == 1:
            self.banks.check_used()

    def rows_per_sample(self, x: Tensor | None, label: str) -> int:
        """k when `x` holds k consecutive rows per sample (windows or heads folded into the batch)."""
        batch = len(self.names)
        if x is None or x.dim() == 0 or x.shape[0] % batch:
            raise ConfigError(
                f"adapter_per_sample: {label} got an input with leading dimension "
                f"{None if x is None else tuple(x.shape)[:1]} for a batch of {batch} names; the names "
                "list must have one entry per sample, and a routed layer must see the batch in its leading dimension "
                "(a layer shared by the whole batch, such as a position-bias MLP, cannot be routed)")
        return x.shape[0] // batch

    @contextmanager
    def within(self, names: tuple[str | None, ...]) -> Iterator[None]:
        self.stack.append(names)
        try:
            yield
        finally:
            self.stack.pop()

    def whole_batch_uses(self, layer: AdapterLayer) -> bool:
        """For parents that read `layer.weight`: True when every sample uses its adapter, False
        when none does; a batch that mixes them cannot share one weight."""
        mine = sum(n == layer.adapter_name for n in self.names)
        if 0 < mine < len(self.names):
            raise ConfigError(
                f"adapter_per_sample: {layer.method_name} of adapter {layer.adapter_name!r} is read "
                f"as one weight by its parent ({type(layer.weighted_layer).__name__}.weight, e.g. "
                "timm EVA/BEiT attention runs F.linear on qkv.weight itself), so one batch cannot "
                "mix samples with and without it. Run those samples in separate batches")
        return mine == len(self.names)

    # -- an adapter layer (layers.py's _gate) ------------------------------------------------------
    def samples_of(self, names: tuple, adapter: str | None) -> list[int]:
        """The positions of `adapter` in `names` (cached: every layer of a forward asks)."""
        key = (names, adapter)
        found = self._samples.get(key)
        if found is None:
            found = self._samples[key] = [i for i, n in enumerate(names) if n == adapter]
        return found

    def rows(self, samples: list[int], k: int, device: torch.device) -> Tensor:
        key = (tuple(samples), k, device)
        found = self._rows.get(key)
        if found is None:
            found = self._rows[key] = _rows(samples, k, device)
        return found

    def __call__(self, layer: AdapterLayer, forward: Callable, args: tuple, kwargs: dict) -> Any:
        names = self.names
        mine = self.samples_of(names, layer.adapter_name)
        if not mine:
            return layer.base_layer(*args, **kwargs)
        if len(mine) == len(names):
            with self.own_tensors(layer):
                return forward(layer, *args, **kwargs)
        label = f"{layer.method_name or type(layer).__name__} of adapter {layer.adapter_name!r}"
        x = _first_tensor(args, kwargs)
        k = self.rows_per_sample(x, label)
        if layer.output_delta is not None and len(args) == 1 and not kwargs:
            out = layer.base_layer(x)  # the whole batch; adapters below route themselves
            rows = self.rows(mine, k, x.device)
            with self.within(tuple(names[i] for i in mine)):
                delta = layer.output_delta(x.index_select(0, rows))  # (n·k, ...): its samples only
            if out is x or out._base is not None or (torch.is_grad_enabled() and out.requires_grad):
                return out.index_add(0, rows, delta.to(out.dtype))  # autograd, or not ours to write
            return out.index_add_(0, rows, delta.to(out.dtype))  # a fresh output: no copy of it
        rest = [i for i, n in enumerate(names) if n != layer.adapter_name]
        runs = [(mine, lambda *a, **kw: self.adapted(layer, forward, a, kw)), (rest, layer.base_layer)]
        return self.split(runs, args, kwargs, k, label)

    def adapted(self, layer: AdapterLayer, forward: Callable, args: tuple, kwargs: dict) -> Any:
        with self.own_tensors(layer):
            return forward(layer, *args, **kwargs)

    @contextmanager
    def own_tensors(self, layer: AdapterLayer) -> Iterator[None]:
        """While `layer` computes for its own samples, the user layers it wraps hold its adapter's
        copies of banked tensors: DoRA, OFT, SSF on a norm, SV-Diff read the wrapped layer's
        weight or bias themselves instead of calling it (which would route)."""
        with self.banks.installed(self.banks.under(layer.base_layer), layer.adapter_name):
            yield

    def split(self, runs: list[tuple[list[int], Callable]], args: tuple, kwargs: dict, k: int,
              label: str) -> Any:
        """Run each group of samples through its function; outputs back in batch order."""
        lead = len(self.names) * k
        outs, order = [], []
        for idx, fn in runs:
            rows = self.rows(idx, k, _first_tensor(args, kwargs).device)
            sub_args, sub_kwargs = _select((args, kwargs), rows, lead)
            with self.within(tuple(self.names[i] for i in idx)):
                outs.append(fn(*sub_args, **sub_kwargs))
            order += idx
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))  # sample -> position in `order`
        return _gather(outs, [len(idx) for idx, _ in runs], inverse, label)


# -- checks -----------------------------------------------------------------------------------------
def _check_names(found: AdapterSet, names: Sequence[str | None]) -> tuple[str | None, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ConfigError(f"adapter_per_sample needs a list with one adapter name (or None) per "
                          f"sample, got {names!r}; adapters: {list(found.states)}")
    unknown = sorted({repr(n) for n in names if n is not None and n not in found.states})
    if unknown:
        raise ConfigError(f"adapter_per_sample: no adapter named {', '.join(unknown)}; adapters: "
                          f"{list(found.states)} (None runs a sample through the base model)")
    return tuple(names)


def _check_batchnorm(model: nn.Module) -> None:
    training = [n for n, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if training:
        raise ConfigError(f"adapter_per_sample: BatchNorm in train mode ({training[0]}, ...) "
                          "normalises with the batch's statistics, which couples the samples, so no "
                          "sample can be computed as if alone; call model.eval() first")


def _check_prompts(model: nn.Module, names: tuple) -> None:
    """VPT adds tokens to the sequence: samples in one batch must all carry the same prompts."""
    from .methods.vpt import PromptLayer
    from .methods.vpt_swin import SwinPrompts

    layout: dict[str | None, list] = {n: [] for n in names}
    for module in model.modules():
        if isinstance(module, (PromptLayer, SwinPrompts)) and module.adapter_name in layout:
            layout[module.adapter_name].append((type(module).__name__, module.tokens))
    kinds = {n: tuple(sorted(v)) for n, v in layout.items()}
    if any(kinds.values()) and len(set(kinds.values())) > 1:
        detail = ", ".join(f"{n!r}: {sum(t for _, t in v) if v else 'no'} prompt tokens"
                           for n, v in layout.items())
        raise ConfigError(
            "adapter_per_sample: VPT changes the sequence length by its prompt tokens, so one batch "
            "can only mix VPT adapters with the same prompt layout, and no sample without VPT "
            f"({detail}). Run those samples in separate batches")


# -- splitting and gathering batches ----------------------------------------------------------------
def _rows(samples: list[int], k: int, device: torch.device) -> Tensor:
    """The rows of `samples` in a (B·k, ...) tensor holding k consecutive rows per sample."""
    idx = torch.tensor(samples, device=device)
    if k == 1:
        return idx
    return (idx[:, None] * k + torch.arange(k, device=device)).reshape(-1)  # (n·k,)


def _select(value: Any, rows: Tensor, lead: int) -> Any:
    """`value` with every tensor whose leading dimension is the batch's (`lead` rows) cut to `rows`."""
    if isinstance(value, Tensor):
        return value.index_select(0, rows.to(value.device)) if value.dim() and value.shape[0] == lead else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_select(v, rows, lead) for v in value)
    if isinstance(value, list):
        return [_select(v, rows, lead) for v in value]
    if isinstance(value, dict):
        return type(value)({k: _select(v, rows, lead) for k, v in value.items()})
    return value


def _gather(outs: list, sizes: list[int], inverse: Tensor, label: str) -> Any:
    """The group outputs (each n_g·k rows, in group order) back in batch order."""
    first = outs[0]
    if isinstance(first, Tensor):
        shapes = {tuple(o.shape[1:]) for o in outs}
        ks = {o.shape[0] // n for o, n in zip(outs, sizes)}
        if len(shapes) > 1 or len(ks) > 1 or any(o.shape[0] % n for o, n in zip(outs, sizes)):
            raise ConfigError(
                f"adapter_per_sample: {label} gives outputs of different shapes for the samples "
                f"routed through it and the others ({[tuple(o.shape) for o in outs]}), so they cannot "
                "share one batch; run them in separate batches")
        k = ks.pop()
        return torch.cat(outs).index_select(0, _rows(inverse.tolist(), k, first.device))
    if isinstance(first, tuple) and not hasattr(first, "_fields"):
        return tuple(_gather([o[j] for o in outs], sizes, inverse, label) for j in range(len(first)))
    if isinstance(first, list):
        return [_gather([o[j] for o in outs], sizes, inverse, label) for j in range(len(first))]
    if isinstance(first, dict):
        return type(first)({key: _gather([o[key] for o in outs], sizes, inverse, label) for key in first})
    return first  # None, shapes, flags: the same for every group
