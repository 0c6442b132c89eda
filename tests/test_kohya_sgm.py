"""SDXL kohya files name the UNet's layers after the original SGM / LDM UNet (input_blocks_...):
mapped onto diffusers' modules as written out by hand below from the LDM block layout, and
checked against diffusers' own loader (lora_state_dict with unet_config)."""

from __future__ import annotations

import copy

import pytest
import torch
from models import make_inputs, run, tiny_unet
from test_kohya import TOL, _formula, _out, _save

import peftvision as pv

pytest.importorskip("diffusers")

# tiny_unet: layers_per_block=1; down = (CrossAttnDown, Down), up = (Up, CrossAttnUp)
SGM_TO_DIFFUSERS = {
    "input_blocks_0_0": "conv_in",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
    "input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_3_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "middle_block_0_out_layers_3": "mid_block.resnets.0.conv2",
    "middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
    "output_blocks_0_0_skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "output_blocks_2_0_in_layers_2": "up_blocks.1.resnets.0.conv1",
    "output_blocks_3_1_transformer_blocks_0_ff_net_2": "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "time_embed_0": "time_embedding.linear_1",
    "out_2": "conv_out",
}
# an up block without attention has its upsampler at .1 (SDXL's never does; diffusers reads
# output_blocks_i_1 as an attention, so this one is checked against the formula only)
UPSAMPLER = {"output_blocks_1_1_conv": "up_blocks.0.upsamplers.0.conv"}


def _file(base, names: dict, seed=0) -> tuple[dict, dict]:
    """(SGM-named kohya tensors, the same under diffusers' names for the reference formula)."""
    g = torch.Generator().manual_seed(seed)
    sgm, plain = {}, {}
    for old, new in names.items():
        w = base.get_submodule(new).weight  # (out, in[, k, k])
        r = 2
        down = torch.randn(r, *w.shape[1:], generator=g) * 0.2
        up = torch.randn(w.shape[0], r, *([1] * (w.dim() - 2)), generator=g) * 0.2
        for key, out in ((f"lora_unet_{old}", sgm), (f"lora_unet_{new.replace('.', '_')}", plain)):
            out.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(1.0)})
    return sgm, plain


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return tiny_unet()


def test_sgm_names_load_onto_the_diffusers_modules(base, tmp_path):
    inputs = make_inputs("unet")
    sgm, plain = _file(base, {**SGM_TO_DIFFUSERS, **UPSAMPLER})
    ours = pv.load_adapter(copy.deepcopy(base), _save(tmp_path / "sdxl.safetensors", sgm))
    (lora,) = pv.state.require_state(ours, "test").methods
    assert sorted(lora.targets) == sorted({**SGM_TO_DIFFUSERS, **UPSAMPLER}.values())
    torch.testing.assert_close(_out(ours, inputs), _out(_formula(base, plain), inputs), **TOL)


def test_sgm_names_give_diffusers_outputs(base, tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    inputs = make_inputs("unet")
    sgm, _ = _file(base, SGM_TO_DIFFUSERS, seed=1)
    path = _save(tmp_path / "sdxl.safetensors", sgm)
    ref = copy.deepcopy(base)
    state, alphas = Loader.lora_state_dict(path, unet_config=ref.config)
    Loader.load_lora_into_unet(state, alphas, unet=ref)
    want = _out(ref, inputs)
    assert (want - run(base, inputs)).abs().max() > 1e-2
    torch.testing.assert_close(_out(pv.load_adapter(copy.deepcopy(base), path), inputs), want, **TOL)
