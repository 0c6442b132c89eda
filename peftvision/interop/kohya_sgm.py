"""SDXL kohya files name UNet layers after the original Stability (SGM / LDM) UNet; map them onto
diffusers' UNet2DConditionModel, in kohya's underscore spelling.

The LDM UNet lists its blocks flat: input_blocks.0.0 is conv_in; input_blocks.i (i >= 1) walks the
down blocks, layers_per_block (resnet .0 + attention .1) then one downsampler (.0.op) per block;
middle_block is resnet, attention, resnet; output_blocks.i walks the up blocks, layers_per_block+1
(resnet .0 + attention .1) per block, the upsampler at .1 (no attention) or .2 after the last.
Inside a resnet, in_layers.2 / emb_layers.1 / out_layers.3 / skip_connection are diffusers'
conv1 / time_emb_proj / conv2 / conv_shortcut; attention internals have diffusers' names already.
"""

from __future__ import annotations

import re

from torch import nn

SGM_NAMES = ("input_blocks", "middle_block", "output_blocks")
RESNET = {"in_layers_2": "conv1", "emb_layers_1": "time_emb_proj", "out_layers_3": "conv2",
          "skip_connection": "conv_shortcut"}
TOP = {"input_blocks_0_0": "conv_in", "time_embed_0": "time_embedding_linear_1",
       "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
       "label_emb_0_2": "add_embedding_linear_2", "out_2": "conv_out"}
_BLOCK = re.compile(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)|middle_block_(\d+)_(.+)")


def _resnet(prefix: str, rest: str) -> str | None:
    return f"{prefix}_{RESNET[rest]}" if rest in RESNET else None


def to_diffusers(flat: str, unet: nn.Module) -> str | None:
    """'input_blocks_4_1_transformer_blocks_0_attn1_to_q' -> 'down_blocks_1_attentions_1_...'
    (underscored diffusers name), or None when `flat` is no SGM name this UNet has."""
    if flat in TOP:
        return TOP[flat]
    per_block = getattr(getattr(unet, "config", None), "layers_per_block", None)
    match = _BLOCK.fullmatch(flat)
    if match is None or not isinstance(per_block, int):
        return None
    kind, index, inner, rest, mid_index, mid_rest = match.groups()
    if mid_index is not None:
        part = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(int(mid_index))
        if part is None:
            return None
        prefix = f"mid_block_{part}"
        return f"{prefix}_{mid_rest}" if part.startswith("attentions") else _resnet(prefix, mid_rest)
    i, j = int(index), int(inner)
    if kind == "input_blocks":
        if i == 0:
            return None
        block, layer = divmod(i - 1, per_block + 1)
        if layer == per_block:  # the block's downsampler
            return f"down_blocks_{block}_downsamplers_0_conv" if (j, rest) == (0, "op") else None
        where = f"down_blocks_{block}"
    else:
        block, layer = divmod(i, per_block + 1)
        where = f"up_blocks_{block}"
        ups = getattr(unet, "up_blocks", [])
        has_attention = block < len(ups) and hasattr(ups[block], "attentions")
        if rest == "conv" and j == (2 if has_attention else 1):
            return f"{where}_upsamplers_0_conv"
    if j == 0:
        return _resnet(f"{where}_resnets_{layer}", rest)
    return f"{where}_attentions_{layer}_{rest}" if j == 1 else None
