"""DiffFit (Xie et al., ICCV 2023): bias and norm parameters train, plus learnable per-channel
scales γ (init 1) in every diffusers transformer block. A BasicTransformerBlock (SD UNets, DiT):

    x = x + γ_attn1 ⊙ attn1(norm1(x))         branch scales on attn1, attn2 and ff
    x = x + γ_attn2 ⊙ attn2(norm2(x), ctx)
    x = x + γ_ff    ⊙ ff(norm3(x))
    and γ on the output channels of to_q, to_k, to_v and to_out.0 of both attentions.

The block adds each residual outside attn1/attn2/ff (any gate of ada-norm blocks multiplies the
branch output too), so scaling a module's output scales exactly its branch: no forward is
patched, the modules are wrapped. γ = 1 makes the model start exactly as the base model.

SD3 / Flux (MMDiT) blocks run one joint attention over the image and context streams; it returns
(image, context), the outputs of its to_out.0 (then dropout) and to_add_out. Their γ are therefore
the two streams' attention branch scales (a second γ on the same outputs would multiply into the
same per-channel function). ff and ff_context get branch scales as above; a Flux single-stream
block's one branch ends in proj_out, which gets the branch scale; its attention has q/k/v only.

Merge: a Linear's scale folds into it (W' = diag(γ)·W, b' = γ ⊙ b); a branch scale folds into the
branch's last Linear (the Attention's to_out.0, the FeedForward's last Linear), exact because
only dropout (and the Attention's division by rescale_output_factor) follows that Linear; an
Attention with residual_connection=True adds its input after to_out.0 and refuses to merge.
Unmerge divides by γ (within rounding, as SSF); a γ with a zero or tiny entry makes merge keep
the exact weight instead (layers.py), so unmerge never divides by zero. The scales are
affine.py's ChannelAffineLayer, as SSF's and IA3's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..affine import ChannelAffineLayer
from ..errors import UnsupportedArchitectureError
from ..layers import AdapterLayer, like_kwargs
from ..registry import register_method
from ..targets import GENERIC, NORM_TYPES, _loaded_class
from .base import ApplyContext, Method, parameters_under

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
JOINT_PROJECTIONS = (*PROJECTIONS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# the diffusers blocks DiffFit places its scales in: (module, class)
BLOCKS = (("diffusers.models.attention", "BasicTransformerBlock"),
          ("diffusers.models.attention", "JointTransformerBlock"),  # SD3
          ("diffusers.models.transformers.transformer_flux", "FluxTransformerBlock"),
          ("diffusers.models.transformers.transformer_flux", "FluxSingleTransformerBlock"))


def _innermost(module: nn.Module) -> nn.Module:
    """The user module inside any adapter wrappers."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


def branch_output_linear(branch: nn.Module) -> tuple[nn.Module | None, str]:
    """(the Linear whose output, up to dropout, is `branch`'s output, '') or (None, why not)."""
    to_out = getattr(branch, "to_out", None)
    if to_out is not None:  # diffusers Attention: to_out = [Linear, Dropout]
        if getattr(branch, "residual_connection", False):
            return None, "the attention adds its input after to_out (residual_connection=True)"
        linear = _innermost(to_out[0])
    else:  # diffusers FeedForward: net = [act (with its own proj), Dropout, Linear, (Dropout)]
        tail = [m for m in getattr(branch, "net", []) if not isinstance(m, nn.Dropout)]
        linear = _innermost(tail[-1]) if tail else None
    if not isinstance(linear, nn.Linear):
        return None, f"{type(branch).__name__} does not end in a Linear"
    return linear, ""


class ChannelScale(ChannelAffineLayer):
    """y = γ ⊙ f(x) over the last (channel) axis; f is a Linear or a whole branch module, whose
    scale folds into the branch's last Linear (merge and unmerge: affine.py)."""

    def __init__(self, base_layer: nn.Module, channels: int) -> None:
        super().__init__(base_layer)
        ref = next(self.weighted_layer.parameters())
        self.difffit_scale = nn.Parameter(torch.ones(channels, **like_kwargs(ref)))

    def affine_params(self) -> tuple[Tensor, None]:
        return self.difffit_scale, None

    @property
    def merge_layer(self) -> nn.Module:
        layer = self.weighted_layer
        return layer if isinstance(layer, nn.Linear) else branch_output_linear(layer)[0]

    def merge_blocker(self) -> str:
        if not isinstance(self.weighted_layer, nn.Linear):
            why = branch_output_linear(self.weighted_layer)[1]
            if why:
                return f"difffit's {type(self.weighted_layer).__name__} branch scale ({why})"
        return super().merge_blocker()


@register_method
@dataclass
class DiffFit(Method):
    """Bias + norm tuning with per-channel scales in every diffusers BasicTransformerBlock."""

    name: ClassVar[str] = "difffit"
    kind: ClassVar[str] = "additive"
    architectures: ClassVar = (GENERIC,)
    placed: ClassVar[bool] = True  # families with BasicTransformerBlocks (families.py), or any model that has them
    placed_where: ClassVar[str] = "DiffFit's scales sit in diffusers transformer blocks (SD UNets, DiT, SD3, Flux)"
    summary: ClassVar[str] = "bias + norm tuning and per-channel scales γ on transformer-block branches and q/k/v/out"
    paper: ClassVar[str] = "Xie et al., ICCV 2023"

    def apply_to(self, ctx: ApplyContext) -> None:
        block_classes = tuple(c for c in (_loaded_class(*spec) for spec in BLOCKS) if c is not None)
        if not block_classes or not any(isinstance(m, block_classes) for m in ctx.model.modules()):
            raise UnsupportedArchitectureError(
                f"difffit needs diffusers transformer blocks (BasicTransformerBlock: SD UNets, DiT; "
                f"JointTransformerBlock: SD3; Flux blocks); {type(ctx.model).__name__} has none")
        for block_name, block in ctx.find(self, list(block_classes), allowed=block_classes):
            for site, channels in _scale_sites(block):
                ctx.wrap(self, f"{block_name}.{site}", partial(ChannelScale, channels=channels))
        # the selective part: every bias and every norm's affine parameters
        chosen = {c: p for c, p in parameters_under("", ctx.model) if c.rpartition(".")[2] == "bias"}
        norms = tuple(c for c in (*NORM_TYPES, _loaded_class("diffusers.models.normalization", "RMSNorm"))
                      if c is not None)
        for name, norm in ctx.find(self, list(norms), allowed=norms):
            chosen.update(parameters_under(name, norm))
        head = tuple(h + "." for h in ctx.head_modules)
        ctx.select(self, ((c, p) for c, p in chosen.items() if not c.startswith(head)))


def _scale_sites(block: nn.Module) -> list[tuple[str, int]]:
    """(submodule of `block`, its output channels) for every γ DiffFit puts in `block`."""
    sites = []
    for branch in ("attn", "attn1", "attn2", "ff", "ff_context"):
        module = _innermost(getattr(block, branch, None))
        if module is None:  # e.g. no attn2 without cross-attention, no ff_context in SD3's last block
            continue
        if branch.startswith("ff"):
            sites.append((branch, branch_output_linear(module)[0].out_features))
            continue
        joint = getattr(module, "add_q_proj", None) is not None  # SD3 / Flux: (image, context) out
        for proj in JOINT_PROJECTIONS if joint else PROJECTIONS:
            if proj == "add_q_proj" and getattr(module, "context_pre_only", False):
                continue  # SD3's last block drops the context stream's attention output
            linear = _innermost(_get(module, proj))
            if isinstance(linear, nn.Linear):  # a pre-only attention has no to_out / to_add_out
                sites.append((f"{branch}.{proj}", linear.out_features))
        to_out = _innermost(_get(module, "to_out.0"))
        if not joint and to_out is not None:
            sites.append((branch, to_out.out_features))
    proj_out = _innermost(getattr(block, "proj_out", None))
    if isinstance(proj_out, nn.Linear):  # Flux single-stream block: its one branch ends in proj_out
        sites.append(("proj_out", proj_out.out_features))
    return sites


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None
