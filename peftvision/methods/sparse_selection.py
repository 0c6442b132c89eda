"""Choosing entries: the scope's tensors, a global top-k, and the sparse layers that train them."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .base import ApplyContext, Method, parameters_under
from .sparse_layers import SparseDeltaLayer

if TYPE_CHECKING:
    from .sparse import SparseMethod


class ScopeEntry(NamedTuple):
    name: str  # canonical parameter name, e.g. "blocks.0.attn.qkv.weight"
    module: str  # canonical name of the module that holds it
    attr: str  # its attribute on that module
    param: nn.Parameter


def scope_entries(ctx: ApplyContext, method: SparseMethod) -> list[ScopeEntry]:
    """The tensors a method may choose entries of, in model order: the backbone (the head is
    trained whole), minus tensors another method already trains. Tensors held by the model
    object itself (a ViT's cls_token / pos_embed) are left out: peftvision never wraps the model."""
    if method.scope is None:
        pairs = parameters_under("", ctx.model)
    else:
        pairs = (p for name, module in ctx.find(method, method.scope)
                 for p in parameters_under(name, module))
    entries: dict[str, ScopeEntry] = {}
    owners: dict[int, str] = {}
    for canonical, param in pairs:
        module, _, attr = canonical.rpartition(".")
        if (canonical in entries or not module or not param.is_floating_point()
                or canonical in ctx.state.selected
                or any(canonical.startswith(h + ".") for h in ctx.head_modules)):
            continue
        if owners.setdefault(id(param), canonical) != canonical:
            raise ConfigError(f"{method.name}: {canonical} and {owners[id(param)]} are one tied "
                              "tensor; exclude one of them with scope=[...]")
        entries[canonical] = ScopeEntry(canonical, module, attr, param)
    if not entries:
        raise ConfigError(f"{method.name}: the scope {method.scope!r} holds no trainable tensor "
                          "outside the head")
    return list(entries.values())


def recorded_selection(method: SparseMethod, entries: list[ScopeEntry]) -> dict[str, Tensor]:
    """Placeholder indices of the recorded sizes (-1: invalid until then), for layers whose
    indices load_adapter copies in from the adapter file."""
    by_name = {e.name: e for e in entries}
    unknown = sorted(set(method.selection) - set(by_name))
    if unknown:
        raise ConfigError(f"{method.name}: the recorded selection names tensors outside this "
                          f"model's scope: {', '.join(unknown[:5])}")
    sparse = {}
    for name, k in method.selection.items():
        if k > by_name[name].param.numel():
            raise ConfigError(f"{method.name}: {k} entries recorded for {name}, which has "
                              f"{by_name[name].param.numel()}")
        sparse[name] = torch.full((k,), -1)
    return sparse


def wrap_sparse(ctx: ApplyContext, method: Method, entries: list[ScopeEntry],
                sparse: dict[str, Tensor]) -> None:
    """One SparseDeltaLayer per module, directly around the user's layer (inside other adapters)."""
    per_module: dict[str, dict[str, Tensor]] = {}
    for e in entries:
        if e.name in sparse and sparse[e.name].numel():
            per_module.setdefault(e.module, {})[e.attr] = sparse[e.name]
    for module, selection in per_module.items():
        ctx.wrap(method, module, lambda m, s=selection: SparseDeltaLayer(m, s), innermost=True)


def top_k(scores: Tensor, k: int) -> Tensor:
    """Positions of the k largest scores, sorted ascending. Ties at the k-th value go to the
    lowest positions, so the choice does not depend on topk's internal order."""
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    kth = torch.topk(scores, k, sorted=False).values.min()
    above = (scores > kth).nonzero().squeeze(1)
    ties = (scores == kth).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def split_positions(positions: Tensor, entries: list[ScopeEntry]) -> dict[str, Tensor]:
    """Sorted global positions (over the entries flattened in order) -> per-tensor flat indices."""
    sizes = torch.tensor([e.param.numel() for e in entries])
    ends = sizes.cumsum(0).to(positions.device)
    cuts = torch.searchsorted(positions, ends).tolist()
    out, start = {}, 0
    for e, end, offset in zip(entries, cuts, (ends - sizes.to(ends.device)).tolist()):
        out[e.name] = positions[start:end] - offset
        start = end
    return out
