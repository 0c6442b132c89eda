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
        # modules whose parent reads them directly (EVA's qkv.weight, MaxViT's rel_pos.get_bias())
        # cannot be wrapped, so their tensors are out of scope rather than silently unadapted
        if (canonical in entries or not module or not param.is_floating_point() or ctx.read_by_parent(module)
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


def flat(tensors: list[Tensor]) -> Tensor:
    """The tensors flattened in order, (N,): their common buffer when they are its consecutive
    views (accumulate_gradients' output), else a concatenated copy."""
    base = tensors[0]._base if tensors else None
    offset = 0
    for t in tensors:
        if t._base is not base or t.storage_offset() != offset or not t.is_contiguous():
            return torch.cat([t.reshape(-1) for t in tensors])
        offset += t.numel()
    if base is None or base.dim() != 1 or base.numel() != offset:
        return torch.cat([t.reshape(-1) for t in tensors])
    return base


_CHUNK = 1 << 22  # elements per pass over the scores: bounds the temporaries to a few MB


def _kth_largest(scores: Tensor, k: int) -> Tensor:
    """The k-th largest of scores ≥ 0, exact, with O(chunk) extra memory (torch.topk on CPU
    copies every (value, index) pair: ~16 bytes per score). For non-negative floats the integer
    view of the bits orders like the values: a radix select, 16 bits per pass from the top."""
    bits = scores.view(torch.int64 if scores.element_size() == 8 else torch.int32)
    chunks = bits.split(_CHUNK)
    prefix, need = 0, k  # the answer's bits found so far; its rank among those sharing them
    for shift in range(bits.element_size() * 8 - 16, -1, -16):
        hist = torch.zeros(1 << 16, dtype=torch.int64)
        for c in chunks:
            if shift + 16 < bits.element_size() * 8:  # only scores whose higher bits match
                c = c[(c >> (shift + 16)) == (prefix >> (shift + 16))]
            hist += torch.bincount(((c >> shift) & 0xFFFF).long(), minlength=1 << 16)
        above = hist.flip(0).cumsum(0)  # above[i]: count with digit ≥ 65535 − i
        i = int(torch.searchsorted(above, need))  # first i with above[i] ≥ need
        digit = 0xFFFF - i
        need -= int(above[i - 1]) if i > 0 else 0
        prefix |= digit << shift
    return torch.tensor(prefix, dtype=bits.dtype).view(scores.dtype)


def top_k(scores: Tensor, k: int) -> Tensor:
    """Positions of the k largest scores, sorted ascending. Ties at the k-th value go to the
    lowest positions, so the choice does not depend on topk's internal order."""
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64) \
            and bool(scores.min() >= 0):
        kth = _kth_largest(scores, k).to(scores.device)
        above = torch.cat([(c > kth).nonzero().squeeze(1) + i * _CHUNK
                           for i, c in enumerate(scores.split(_CHUNK))])
        ties = torch.cat([(c == kth).nonzero().squeeze(1) + i * _CHUNK
                          for i, c in enumerate(scores.split(_CHUNK))])[: k - above.numel()]
        return torch.cat([above, ties]).sort().values
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
