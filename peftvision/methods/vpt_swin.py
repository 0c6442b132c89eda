"""VPT on timm Swin v1 and v2: the VPT paper's Swin variant (Jia et al., ECCV 2022, appendix).

Swin attends within windows of a 2-D token grid (B, H, W, C), so prompts cannot just lengthen a
sequence. As in the paper's Swin code:
- P prompts (B, P, C) travel beside the grid through every block and every patch merging;
- in a block, each window attends over [its sample's prompts, its window tokens]: the relative
  position bias and the shifted-window mask are zero on prompt rows and columns, and a prompt's
  output is the mean of its outputs over the sample's windows;
- norms, MLPs, residuals and drop-path treat prompts as ordinary tokens;
- patch merging reads each prompt as its own 2x2 neighbourhood (4 copies), so prompts take the
  next stage's width through the layer's own norm and reduction;
- deep: before every block the prompts are replaced by that block's own set (the first block's
  set is the shallow one), so a stage's merged prompts are never used and are not computed;
- prompts leave after the last stage: the final norm and the head see the usual grid.
The paper's code pairs window w of sample b with the prompts of sample (b·nW + w) mod B once the
prompts differ per sample (after the first shallow block); here every window reads its own
sample's prompts. Swin v2 (not in the paper) gets the same layout with its post-norm blocks and
cosine attention; its prompt rows and columns of the position bias are zero as in v1.

One wrapper on `model.layers` runs the stages' steps itself (their forward is not called), through
each block's own norm1, qkv, proj, mlp, norm2 and each merging's norm and reduction, so adapters on
those layers still apply; an adapter on a whole stage, block or attention would be skipped, so it
is refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import Tensor, nn

from ..errors import UnsupportedArchitectureError
from ..layers import AdapterLayer


def is_swin_v2(model: nn.Module) -> bool:
    return type(model).__name__ == "SwinTransformerV2"


def check_runnable(layers: nn.Module) -> None:
    """Refuse adapters that the runner would skip: on a stage, its blocks, a block or its attention."""
    for i, stage in enumerate(layers):
        for name, module in (("", stage), ("blocks", getattr(stage, "blocks", None)),
                             ("downsample", getattr(stage, "downsample", None)),
                             *((f"blocks.{j}", b) for j, b in enumerate(getattr(stage, "blocks", ()))),
                             *((f"blocks.{j}.attn", getattr(b, "attn", None))
                               for j, b in enumerate(getattr(stage, "blocks", ())))):
            if isinstance(module, AdapterLayer):
                where = f"layers.{i}.{name}".rstrip(".")
                raise UnsupportedArchitectureError(
                    f"vpt on Swin runs each block's steps itself, so the {module.method_name or 'adapter'} "
                    f"wrapper on {where} would be skipped; apply vpt alone or with adapters on the "
                    "blocks' layers (qkv, proj, mlp, norms)")


class SwinPrompts(AdapterLayer):
    """Wraps `model.layers`: runs the stages with prompt tokens beside the token grid."""

    mergeable = False
    why_not_mergeable = "VPT prompts are extra tokens, not a weight change"
    reads_wrapped_layer = True  # runs the user's stages itself: another adapter's wrapper here is skipped

    def __init__(self, base_layer: nn.Module, tokens: int, widths: list[int], init_bound: float,
                 dropout: float, deep: bool, like: Tensor) -> None:
        super().__init__(base_layer)
        self.tokens, self.deep = tokens, deep
        kw = {"dtype": like.dtype, "device": like.device}
        self.prompts = nn.ParameterList(  # one (1, P, C) set: shallow; one per block: deep
            nn.Parameter(torch.empty(1, tokens, w, **kw).uniform_(-init_bound, init_bound)) for w in widths)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # x: (B, H, W, C) from the patch embedding
        stages = self.weighted_layer  # the user's Sequential, under other adapters' prompt wrappers
        check_runnable(stages)
        sets = iter(self.prompts)
        p = None
        for stage in stages:
            if p is not None and not self.deep and not isinstance(stage.downsample, nn.Identity):
                p = merge_prompts(stage.downsample, p)  # (B, P, C) -> (B, P, C')
            x = stage.downsample(x)
            for block in stage.blocks:
                if p is None or self.deep:
                    fresh = self.dropout(next(sets).to(x.dtype))
                    p = repeat(fresh, "1 p c -> b p c", b=x.shape[0])  # (B, P, C)
                x, p = block_with_prompts(block, x, p)
        return x


def merge_prompts(merging: nn.Module, p: Tensor) -> Tensor:
    """Patch merging of prompts: each prompt as a 2x2 patch of 4 copies of itself, through the
    layer's own forward (v1: norm then reduction; v2: reduction then norm)."""
    grid = repeat(p, "b p c -> b i (p j) c", i=2, j=2)  # (B, 2, 2P, C): prompt k fills columns 2k, 2k+1
    return merging(grid).flatten(1, 2)  # (B, 1, P, C') -> (B, P, C')


def block_with_prompts(block: nn.Module, x: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """One Swin block on the grid x (B, H, W, C) and the prompts p (B, P, C)."""
    B, H, W, C = x.shape
    P = p.shape[1]
    v2 = type(block).__name__ == "SwinTransformerV2Block"
    tokens = torch.cat([p, x.reshape(B, H * W, C)], dim=1)  # (B, P + HW, C)
    if v2:  # post-norm: x + norm1(attn(x)), then x + norm2(mlp(x))
        a, ap = window_attention(block, x, p)
        tokens = tokens + block.drop_path1(block.norm1(torch.cat([ap, a.reshape(B, H * W, C)], dim=1)))
        tokens = tokens + block.drop_path2(block.norm2(block.mlp(tokens)))
    else:  # pre-norm: x + attn(norm1(x)), then x + mlp(norm2(x))
        a, ap = window_attention(block, block.norm1(x), block.norm1(p))
        tokens = tokens + block.drop_path1(torch.cat([ap, a.reshape(B, H * W, C)], dim=1))
        tokens = tokens + block.drop_path2(block.mlp(block.norm2(tokens)))
    return tokens[:, P:].reshape(B, H, W, C), tokens[:, :P]


def window_attention(block: nn.Module, h: Tensor, hp: Tensor) -> tuple[Tensor, Tensor]:
    """The block's (shifted) window attention with the prompts in front of every window:
    h (B, H, W, C), hp (B, P, C) -> (B, H, W, C), (B, P, C)."""
    B, H, W, C = h.shape
    (wh, ww), (sh, sw) = block.window_size, block.shift_size
    if sh or sw:
        h = torch.roll(h, shifts=(-sh, -sw), dims=(1, 2))
    h = F.pad(h, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))  # to whole windows
    Hp = h.shape[1]
    mask = block.get_attn_mask(h) if getattr(block, "dynamic_mask", False) else block.attn_mask
    windows = rearrange(h, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=wh, ww=ww)  # (B·nW, N, C)
    n_win = windows.shape[0] // B
    prompts = repeat(hp, "b p c -> (b w) p c", w=n_win)  # each window gets its own sample's prompts
    out = attend(block.attn, torch.cat([prompts, windows], dim=1), mask, hp.shape[1])  # (B·nW, P + N, C)
    P = hp.shape[1]
    prompt_out = reduce(out[:, :P], "(b w) p c -> b p c", "mean", w=n_win)  # (B, P, C)
    grid = rearrange(out[:, P:], "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c", b=B, nh=Hp // wh, wh=wh)
    grid = grid[:, :H, :W]
    if sh or sw:
        grid = torch.roll(grid, shifts=(sh, sw), dims=(1, 2))
    return grid, prompt_out


def attend(attn: nn.Module, t: Tensor, mask: Tensor | None, P: int) -> Tensor:
    """Swin window attention over t (B·nW, P + N, C); position bias and mask zero on prompts."""
    Bw, L, _ = t.shape
    heads = attn.num_heads
    v2 = hasattr(attn, "logit_scale")
    if v2 and attn.q_bias is not None:  # v2 reads qkv.weight with its own q / k / v biases
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(t) + bias if attn.qkv_bias_separate else F.linear(t, attn.qkv.weight, bias)
    else:
        qkv = attn.qkv(t)
    q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=heads).unbind(0)  # (B·nW, h, L, d)
    if v2:
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, heads)
        rel = table[attn.relative_position_index.view(-1)].view(L - P, L - P, heads)
        rel = 16 * torch.sigmoid(rel.permute(2, 0, 1))  # (h, N, N)
    else:
        rel = attn._get_rel_pos_bias()[0]  # (h, N, N)
    rel = F.pad(rel, (P, 0, P, 0)).unsqueeze(0)  # (1, h, L, L): zero on prompt rows / columns
    if mask is not None:  # (nW, N, N) -> (B·nW, 1, L, L)
        n_win = mask.shape[0]
        rel = rel + repeat(F.pad(mask, (P, 0, P, 0)), "w i j -> (b w) 1 i j", b=Bw // n_win)
    if v2:
        logit_scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp()
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * logit_scale + rel
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    else:
        drop = attn.attn_drop.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=rel.to(q.dtype), dropout_p=drop, scale=attn.scale)
    return attn.proj_drop(attn.proj(rearrange(out, "b h l d -> b l (h d)")))
