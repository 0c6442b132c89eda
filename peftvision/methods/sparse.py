"""Sparse deltas: train k chosen entries of existing weight tensors (shared by SH-PEFT and SPT).

The trained state of one tensor W is a values vector (k,) and its flat indices (k,), never a
dense mask: gradients, optimizer state and the saved adapter grow with k, not with W. Read top
to bottom:

1. autograd Functions for Linear and Conv: W + Δ is built for the product and dropped, and rebuilt
   in backward (a weight-sized temporary per layer, never one kept alive for backward); the
   values' gradient is a sampled matmul at the chosen entries for Linear;
2. SparseDeltaLayer, the AdapterLayer holding the deltas of one module's tensors;
3. SparseMethod, the config both methods share: data, budget, scope, the recorded selection;
4. the selection pipeline: scope -> gradients over the data -> global top-k -> layers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError, CorruptAdapterError
from ..layers import AdapterLayer
from ..targets import ARCHITECTURES, TargetSpec, check_target_spec
from .base import ApplyContext, Method, MethodFacts, number_in, parameters_under, positive_int

# Below this share of a Linear weight, the values' gradient is a sampled matmul at the chosen
# entries; above it a dense weight gradient is cheaper (measured crossover on CPU: about 10%).
SAMPLED_MAX_DENSITY = 0.05


def add_at(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """W + Δ as a new tensor, Δ holding `values` at the flat `indices` of W (out of place)."""
    return weight.reshape(-1).index_add(0, indices, values).view(weight.shape)


def sampled_weight_grad(grad: Tensor, x: Tensor, indices: Tensor, shape: torch.Size) -> Tensor:
    """(gradᵀ·x) at the flat `indices` of an (out, in) weight, without the dense product.

    grad (M, out), x (M, in), indices sorted: their row-major order is the CSR order."""
    out_features, in_features = shape
    rows = torch.div(indices, in_features, rounding_mode="floor")
    cols = indices - rows * in_features
    crow = indices.new_zeros(out_features + 1)
    crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(crow, cols, grad.new_zeros(indices.numel()), shape,
                                          check_invariants=False)  # indices checked on load
        return torch.sparse.sampled_addmm(pattern, grad.T, x, beta=0.0).values()  # (k,)


def _use_sampled(indices: Tensor, weight: Tensor) -> bool:
    return (weight.dtype in (torch.float32, torch.float64)
            and indices.numel() <= SAMPLED_MAX_DENSITY * weight.numel())


class _SparseLinear(torch.autograd.Function):
    """y = x·(W + Δ)ᵀ + b; returns gradients for x, values and b (and W only if it trains)."""

    @staticmethod
    def forward(ctx, x, values, indices, weight, bias):
        need_x, need_v, _, need_w, _ = ctx.needs_input_grad
        ctx.save_for_backward(x if (need_v or need_w) else None, values, indices, weight)
        return F.linear(x, add_at(weight, indices, values), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad):
        x, values, indices, weight = ctx.saved_tensors
        need_x, need_v, _, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_v = grad_w = grad_b = None
        if need_x:
            grad_x = grad @ add_at(weight, indices, values)  # (..., in)
        grad2 = grad.reshape(-1, grad.shape[-1])  # (M, out)
        if need_w or (need_v and not _use_sampled(indices, weight)):
            grad_w = grad2.T @ x.reshape(-1, x.shape[-1])  # (out, in): dense only if needed
        if need_v:
            grad_v = (grad_w.reshape(-1)[indices] if grad_w is not None
                      else sampled_weight_grad(grad2, x.reshape(-1, x.shape[-1]), indices, weight.shape))
        if need_b:
            grad_b = grad2.sum(0)
        return grad_x, grad_v, None, grad_w if need_w else None, grad_b


class _SparseConv(torch.autograd.Function):
    """conv(x, W + Δ, b) for nn.Conv1d/2d/3d. The weight gradient of a conv is one dense
    convolution_backward (as in full fine-tuning); the values take their k entries of it."""

    @staticmethod
    def forward(ctx, x, values, indices, weight, bias, conv):
        ctx.conv = conv
        ctx.save_for_backward(x, values, indices, weight)
        return conv._conv_forward(x, add_at(weight, indices, values), bias)  # (B, out, *spatial)

    @staticmethod
    def backward(ctx, grad):
        x, values, indices, weight = ctx.saved_tensors
        conv = ctx.conv
        need_x, need_v, _, need_w, need_b, _ = ctx.needs_input_grad
        w = add_at(weight, indices, values)
        if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad, x, w, None, conv.stride, conv.padding, conv.dilation, False,
                [0] * len(conv.stride), conv.groups, [need_x, need_v or need_w, False])
        else:  # padding modes / 'same': differentiate a re-run of the conv
            with torch.enable_grad():
                x_ = x.detach().requires_grad_(need_x)
                w_ = w.detach().requires_grad_(True)
                inputs = (x_, w_) if need_x else (w_,)
                grads = torch.autograd.grad(conv._conv_forward(x_, w_, None), inputs, grad)
            grad_x, grad_w = grads if need_x else (None, grads[0])
        grad_v = grad_w.reshape(-1)[indices] if need_v else None
        grad_b = grad.sum(dim=(0, *range(2, grad.dim()))) if need_b else None
        return grad_x, grad_v, None, grad_w if need_w else None, grad_b, None


_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


def _fast_kind(layer: nn.Module) -> str:
    """'linear' / 'conv' for layers whose forward is exactly torch's, else '' (generic path)."""
    forward = type(layer).forward
    if isinstance(layer, nn.Linear) and forward is nn.Linear.forward:
        return "linear"
    if isinstance(layer, nn.modules.conv._ConvNd) and forward in _CONV_FORWARDS:
        return "conv"
    return ""


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


class SparseDeltaLayer(AdapterLayer):
    """Sparse additive deltas on some of the wrapped module's own tensors.

    Per adapted tensor p (`weight`, `bias`, a norm's or LayerScale's vector...):
      values_<p>   Parameter (k,), zero at init (identity)
      indices_<p>  persistent buffer (k,), int32 (int64 past 2³¹ entries): sorted unique flat
                   positions in p, saved in the adapter so a reload needs no data.
    Linear and Conv run through the Functions above; any other module runs its own forward
    with p + Δp swapped in (torch.func.functional_call). Merge writes W[i] + v into the k
    entries and keeps their old values, so unmerge restores W bitwise.
    """

    def __init__(self, base_layer: nn.Module, selection: dict[str, Tensor]) -> None:
        super().__init__(base_layer)
        layer = self.weighted_layer
        self.names = tuple(selection)
        self._checked: dict[str, tuple] = {}
        for name, idx in selection.items():
            param = layer._parameters[name]
            if not param.is_contiguous():
                raise ConfigError(f"sparse deltas need contiguous tensors; {name} of "
                                  f"{type(layer).__name__} is not")
            self.register_buffer(f"indices_{name}", idx.to(param.device, index_dtype(param.numel())))
            self.register_parameter(f"values_{name}", nn.Parameter(
                torch.zeros(idx.numel(), dtype=param.dtype, device=param.device)))

    # -- the deltas -------------------------------------------------------------------------
    def target(self, name: str) -> Tensor:
        return self.weighted_layer._parameters[name]

    def indices(self, name: str) -> Tensor:
        """The indices of `name`, checked once per change (e.g. after load_adapter's copy_)."""
        idx = getattr(self, f"indices_{name}")
        key = (id(idx), idx.data_ptr(), idx._version, idx.device)
        if self._checked.get(name) != key:
            numel = self.target(name).numel()
            ok = idx.dim() == 1 and not idx.is_floating_point()
            ok = ok and (idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < numel))
            ok = ok and bool((idx[1:] > idx[:-1]).all())
            if not ok:
                raise CorruptAdapterError(
                    f"indices_{name} of {type(self.weighted_layer).__name__} are not sorted unique "
                    f"positions in [0, {numel}): a config with a recorded selection only rebuilds "
                    "the layers and load_adapter fills them in; otherwise the adapter is corrupt")
            self._checked[name] = key
        return idx

    def effective(self, name: str) -> Tensor:
        """p + Δp (differentiable in the values)."""
        return add_at(self.target(name), self.indices(name), getattr(self, f"values_{name}"))

    def forward(self, *args, **kwargs):
        layer = self.base_layer
        if self.merged:
            return layer(*args, **kwargs)
        kind = "" if isinstance(layer, AdapterLayer) else _fast_kind(layer)
        if kind and "weight" in self.names and len(args) == 1 and not kwargs:
            bias = self.effective("bias") if "bias" in self.names else layer.bias
            values, idx = self.values_weight, self.indices("weight")
            if kind == "linear":
                return _SparseLinear.apply(args[0], values, idx, layer.weight, bias)
            return _SparseConv.apply(args[0], values, idx, layer.weight, bias, layer)
        prefix = ""  # path from base_layer down to the user's layer, through nested adapters
        while isinstance(layer, AdapterLayer):
            prefix, layer = prefix + "base_layer.", layer.base_layer
        swapped = {prefix + name: self.effective(name) for name in self.names}
        return functional_call(self.base_layer, swapped, args, kwargs)

    # -- merge / unmerge: in place on the k entries, exact -----------------------------------
    def merge_blocker(self) -> str:
        return ""

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        for name in self.names:
            flat, idx = self.target(name).view(-1), self.indices(name)
            saved = flat[idx]  # (k,) a copy: what unmerge writes back
            flat[idx] = saved + getattr(self, f"values_{name}")  # the forward's W[i] + v, bitwise
            self.register_buffer(f"_saved_{name}", saved, persistent=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for name in self.names:
            self.target(name).view(-1)[self.indices(name)] = getattr(self, f"_saved_{name}")
            self.register_buffer(f"_saved_{name}", None, persistent=False)
        self.merged = False

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{n}: {getattr(self, f'values_{n}').numel()}/{self.target(n).numel()}"
                          for n in self.names)
        return f"{super().extra_repr()}, {sizes}"


# ---- the shared config ---------------------------------------------------------------------

DEFAULT_FRACTION = 0.01


@dataclass
class SparseMethod(Method):
    """Fields shared by data-selected sparse methods. `data` and `loss_fn` are runtime-only:
    apply consumes them and records `selection` (tensor -> count) instead, which is what
    adapter_config.json keeps; the chosen indices themselves are adapter tensors."""

    data: Iterable | None = None  # (inputs, targets) batches; inputs a tensor, tuple or dict
    fraction: float | None = None  # share of the scope's entries to choose; default 0.01
    count: int | None = None  # or an exact number of entries
    batches: int | None = None  # None: one pass over `data`
    loss_fn: Callable | None = None  # loss_fn(model_output, targets); default cross-entropy
    scope: TargetSpec = None  # modules whose tensors may be chosen; None: the whole backbone
    selection: dict[str, int] | None = None  # filled by apply: canonical tensor name -> count

    kind: ClassVar[str] = "additive"
    architectures: ClassVar = ARCHITECTURES
    runtime_fields: ClassVar[tuple[str, ...]] = ("data", "loss_fn")
    test_facts: ClassVar = MethodFacts(needs_data=True)  # tests/test_sparse_methods.py
    recorded_fields: ClassVar[tuple[str, ...]] = ()  # more fields `record` fills in

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

    def record(self, sparse: dict[str, Tensor], lora: list[str]) -> None:
        self.selection = {name: int(idx.numel()) for name, idx in sparse.items()}

    def apply_to(self, ctx: ApplyContext) -> None:
        ctx.require_architecture(self)
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
            fields = ("data", "loss_fn", "selection", "_chosen", *self.recorded_fields)
            undo = {f: getattr(self, f, None) for f in fields}
            ctx.journal.record(lambda: [setattr(self, f, v) for f, v in undo.items()])
            self.record(sparse, lora)
            self._chosen = {name: idx.cpu() for name, idx in sparse.items()}  # re-apply: same
            self.data = self.loss_fn = None  # consumed: the config now carries the selection
        wrap_sparse(ctx, self, entries, sparse)
        for module in lora:
            self.wrap_lora(ctx, module)


# ---- selection pipeline ----------------------------------------------------------------------

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
    """The indices this config object chose, when it did (applying it again gives the same
    model); else layers of the recorded sizes whose indices (-1: invalid until then) load_adapter
    copies in from the adapter file."""
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
    chosen = getattr(method, "_chosen", None)
    if chosen is not None and {n: int(i.numel()) for n, i in chosen.items()} == method.selection:
        return dict(chosen)
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


def default_loss(output: Any, targets: Tensor) -> Tensor:
    return F.cross_entropy(output, targets)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _run(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def accumulate_gradients(model: nn.Module, params: list[nn.Parameter], data: Iterable,
                         batches: int | None, loss_fn: Callable, *, square: bool,
                         method: str) -> list[Tensor]:
    """Per parameter, Σ_b g_b² (square) or Σ_b g_b, with g_b = ∂loss_b/∂p over `batches`
    batches of `data` (None: all of it).

    Eval mode (no dropout; BatchNorm uses and keeps its running statistics), so the choice is
    deterministic; only `params` require grad meanwhile. Each gradient is folded into a float32
    accumulator as backward produces it and then dropped. The model is left as it was: modes,
    requires_grad flags and .grad attributes are restored, also on error."""
    acc = [torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
           for p in params]

    def fold(i: int) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            g = p.grad.to(acc[i].dtype)
            acc[i].addcmul_(g, g) if square else acc[i].add_(g)
            p.grad = None
        return hook

    everything = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in everything]
    modes = [(m, m.training) for m in model.modules()]
    chosen = {id(p) for p in params}
    handles = []
    device = params[0].device
    seen = 0
    try:
        for p in everything:
            p.grad = None
            p.requires_grad_(id(p) in chosen)
        handles = [p.register_post_accumulate_grad_hook(fold(i)) for i, p in enumerate(params)]
        model.eval()
        with torch.enable_grad():
            for batch in data:
                if batches is not None and seen >= batches:
                    break
                if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                    raise ConfigError(f"{method}: each batch of data must be (inputs, targets), got "
                                      f"{type(batch).__name__}")
                inputs, targets = _to(batch[0], device), _to(batch[1], device)
                loss = loss_fn(_run(model, inputs), targets)
                if not (isinstance(loss, Tensor) and loss.numel() == 1):
                    raise ConfigError(f"{method}: loss_fn must return a scalar tensor, got {loss!r:.80}")
                if not loss.requires_grad:
                    raise ConfigError(f"{method}: the loss does not depend on the model's weights "
                                      "(no gradient flows); check loss_fn and the model's output")
                if not torch.isfinite(loss):
                    raise ConfigError(f"{method}: the loss of batch {seen} is {loss.item()}")
                loss.backward()
                seen += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
        for m, training in modes:
            m.training = training
    if seen == 0:
        raise ConfigError(f"{method}: data yielded no batches; pass a non-empty iterable of "
                          "(inputs, targets)")
    return acc


def check_gradient(method: str, task: list[Tensor]) -> float:
    """Σ of the task-specific importance; raises when no gradient reached the scope."""
    total = sum(float(a.sum(dtype=torch.float64)) for a in task)
    if not math.isfinite(total):
        raise ConfigError(f"{method}: the gradients over data are not finite")
    if total == 0.0:
        raise ConfigError(f"{method}: no gradient reached the tensors in scope (all zero); check "
                          "that the loss depends on them and that data has non-trivial targets")
    return total


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
