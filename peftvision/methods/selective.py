"""Selective methods: they only choose which existing parameters train, and add no modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..errors import TargetError, UnsupportedArchitectureError
from ..registry import ReportedCount, register_method
from ..targets import NORM_TYPES, TargetSpec
from .base import ApplyContext, Method, parameters_under


@dataclass
class SelectiveMethod(Method):
    """Selects the parameters of the matched modules that `wanted` accepts."""

    targets: TargetSpec = None
    # Parameters by exact name, trained too: bare ones such as ViT's `pos_embed` or `cls_token`
    # belong to no module a target can match (Dutt et al.'s attention tuning trains `pos_embed`).
    extra_params: tuple[str, ...] = ()
    module_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Module,)

    def default_targets(self, ctx: ApplyContext) -> TargetSpec:
        return list(self.module_types)  # every module of the method's types

    def wanted(self, param_name: str) -> bool:
        return True

    def apply_to(self, ctx: ApplyContext) -> None:
        spec = self.target_spec(ctx)
        # spec None: the whole model (cheaper than matching every module)
        try:
            modules = [("", ctx.model)] if spec is None else ctx.find(self, spec, allowed=self.module_types)
        except TargetError as exc:
            if getattr(self, "targets", None) is not None:
                raise
            raise UnsupportedArchitectureError(f"{self.name}: {exc}") from exc  # e.g. no BatchNorm at all
        chosen: dict[str, nn.Parameter] = {}
        for name, module in modules:
            for canonical, param in parameters_under(name, module):
                if self.wanted(canonical.rpartition(".")[2]) and not _in_head(canonical, ctx):
                    chosen[canonical] = param
        chosen.update(_extra_params(self, ctx))
        if not chosen:
            raise UnsupportedArchitectureError(
                f"{self.name}: the matched modules of {type(ctx.model).__name__} hold no parameter "
                f"this method trains; pass other targets=[...]")
        ctx.select(self, chosen.items())


def _extra_params(method: SelectiveMethod, ctx: ApplyContext) -> dict[str, nn.Parameter]:
    if not method.extra_params:
        return {}
    if isinstance(method.extra_params, str):
        raise TargetError(f"{method.name}: extra_params takes a list of parameter names, "
                          f"e.g. extra_params=[{method.extra_params!r}]")
    every = dict(parameters_under("", ctx.model))
    missing = [n for n in method.extra_params if n not in every]
    if missing:
        bare = [n for n in every if "." not in n]
        raise TargetError(f"{method.name}: extra_params {missing} name no parameter of "
                          f"{type(ctx.model).__name__}; its bare parameters are {bare or 'none'} "
                          "(or give a full name such as 'blocks.0.norm1.weight')")
    head = [n for n in method.extra_params if _in_head(n, ctx)]
    if head:
        raise TargetError(f"{method.name}: extra_params {head} are in the classifier head, which "
                          "trains anyway; leave them out")
    return {n: every[n] for n in method.extra_params}


def _in_head(canonical: str, ctx: ApplyContext) -> bool:
    return any(canonical.startswith(h + ".") for h in ctx.head_modules)


@register_method
@dataclass
class Full(SelectiveMethod):
    name: ClassVar[str] = "full"
    summary: ClassVar[str] = "full fine-tuning: every parameter trains"

    def apply_to(self, ctx: ApplyContext) -> None:
        ctx.select(self, ((c, p) for c, p in parameters_under("", ctx.model) if not _in_head(c, ctx)))


@register_method
@dataclass
class Linear(SelectiveMethod):
    name: ClassVar[str] = "linear"
    aliases: ClassVar[tuple[str, ...]] = ("linear_probe",)
    needs: ClassVar[str] = "classifier"
    summary: ClassVar[str] = "linear probing: only the classifier head trains"

    def apply_to(self, ctx: ApplyContext) -> None:
        if not ctx.head_modules:
            raise UnsupportedArchitectureError(
                f"linear probing needs a classifier head, and {type(ctx.model).__name__} has none "
                "(timm models expose it through get_classifier(); create the model with num_classes>0)")
        if not ctx.state.train_head:
            raise UnsupportedArchitectureError("linear probing trains only the head; "
                                               "it cannot be combined with train_head=False")


@register_method
@dataclass
class Bias(SelectiveMethod):
    name: ClassVar[str] = "bias"
    aliases: ClassVar[tuple[str, ...]] = ("bitfit",)
    summary: ClassVar[str] = "BitFit: every bias term trains"
    paper: ClassVar[str] = "Ben Zaken et al., ACL 2022"

    def default_targets(self, ctx):
        return None

    def wanted(self, param_name: str) -> bool:
        return param_name == "bias"


@register_method
@dataclass
class BatchNorm(SelectiveMethod):
    name: ClassVar[str] = "batchnorm"
    module_types: ClassVar = (nn.modules.batchnorm._BatchNorm,)
    needs: ClassVar[str] = "batchnorm"
    summary: ClassVar[str] = "BatchNorm affine parameters train"


@register_method
@dataclass
class LayerNorm(SelectiveMethod):
    name: ClassVar[str] = "layernorm"
    module_types: ClassVar = (nn.LayerNorm,)
    needs: ClassVar[str] = "layernorm"
    summary: ClassVar[str] = "LayerNorm affine parameters train"


@register_method
@dataclass
class Norm(SelectiveMethod):
    name: ClassVar[str] = "norm"
    module_types: ClassVar = NORM_TYPES
    needs: ClassVar[str] = "norm"
    summary: ClassVar[str] = "every normalisation layer's affine parameters train"


@register_method
@dataclass
class Attention(SelectiveMethod):
    name: ClassVar[str] = "attention"
    placed: ClassVar[bool] = True  # the attention modules of each family (families.py)
    summary: ClassVar[str] = "attention tuning: ViT `attn` modules, UNet `attentions` blocks"
    targets_hint: ClassVar[str] = "names of its attention modules"
    reported: ClassVar = (ReportedCount("vit_base_patch16_224", "28.5M", "Dutt et al., MIDL 2024, appendix",
                                        (("extra_params", ("pos_embed",)),)),)  # `.attn.` + pos_embed

    def default_targets(self, ctx):  # the presets, not SelectiveMethod's module types
        return Method.default_targets(self, ctx)
