"""Tiny instances of the real timm / diffusers classes (pretrained=False) and their inputs."""

from __future__ import annotations

import torch
from torch import nn

BATCH = 2


def tiny_vit(**kw) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)
    return VisionTransformer(**{**cfg, **kw})


def tiny_resnet(block: str = "bottleneck", **kw) -> nn.Module:
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    cfg = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8, num_classes=5,
               zero_init_last=False)  # zero-init last BN would make the blocks' outputs trivial
    return ResNet(block=Bottleneck if block == "bottleneck" else BasicBlock, **{**cfg, **kw})


def tiny_unet(**kw) -> nn.Module:
    from diffusers import UNet2DConditionModel

    cfg = dict(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
               attention_head_dim=8, norm_num_groups=8, sample_size=8, in_channels=4, out_channels=4,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return UNet2DConditionModel(**{**cfg, **kw})


FACTORIES = {"vit": tiny_vit, "resnet": tiny_resnet, "unet": tiny_unet}


def make_model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FACTORIES[arch]()


def make_inputs(arch: str, seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    if arch == "unet":
        return (torch.randn(BATCH, 4, 8, 8, generator=g), torch.tensor([10, 500]),
                torch.randn(BATCH, 3, 16, generator=g))
    return (torch.randn(BATCH, 3, 32, 32, generator=g),)


def run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    out = model(*inputs)
    return out.sample if hasattr(out, "sample") else out


def make_target(arch: str, out: torch.Tensor, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if arch == "unet":
        return torch.randn(out.shape, generator=g)
    return torch.randint(0, out.shape[-1], (out.shape[0],), generator=g)


def loss_fn(arch: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if arch == "unet":
        return nn.functional.mse_loss(out, target)
    return nn.functional.cross_entropy(out, target)


# ---- the zoo: one tiny model per registered family (tests/test_matrix.py) -----------------------

def _vit(**kw):
    return lambda: tiny_vit(**kw)


def _timm(name: str, **kw):
    def make():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=5, **kw)

    return make


_TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny_deit_distilled() -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(**_TINY_VIT, mlp_ratio=2.0, num_classes=5)


def tiny_maxxvit(blocks: tuple[str, ...]) -> nn.Module:
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitTransformerCfg

    cfg = MaxxVitCfg(embed_dim=(16, 32), depths=(1, 1), block_type=blocks, stem_width=16,
                     transformer_cfg=MaxxVitTransformerCfg(dim_head=8, window_size=(2, 2), grid_size=(2, 2)))
    return MaxxVit(cfg, img_size=32, num_classes=5)


def tiny_resnetv2() -> nn.Module:
    from functools import partial

    from timm.layers import GroupNormAct
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=(1, 1), channels=(32, 64), stem_chs=8, num_classes=5,
                    norm_layer=partial(GroupNormAct, num_groups=4))


def tiny_seresnet() -> nn.Module:
    from timm.layers import get_attn
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(8, 16, 16, 16), stem_width=8, num_classes=5,
                  block_args=dict(attn_layer=get_attn("se")), zero_init_last=False)


def tiny_efficientnet(mobilenet: bool = False) -> nn.Module:
    from timm.models._efficientnet_builder import decode_arch_def

    if mobilenet:
        from timm.models.mobilenetv3 import MobileNetV3 as cls

        arch = [["ds_r1_k3_s2_e1_c8_se0.25_nre"], ["ir_r1_k3_s2_e2_c16_nre"], ["ir_r1_k5_s2_e2_c24_se0.25"]]
    else:
        from timm.models.efficientnet import EfficientNet as cls

        arch = [["ds_r1_k3_s1_e1_c8_se0.25"], ["ir_r1_k3_s2_e2_c16_se0.25"], ["ir_r1_k5_s2_e2_c24_se0.25"]]
    return cls(decode_arch_def(arch), num_features=64, stem_size=8, num_classes=5)


def tiny_regnet() -> nn.Module:
    from timm.models.regnet import RegNet, RegNetCfg

    return RegNet(RegNetCfg(depth=5, w0=8, wa=10, wm=2, group_size=8, stem_width=8, se_ratio=0.25),
                  num_classes=5, zero_init_last=False)


def tiny_densenet() -> nn.Module:
    from timm.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(1, 1), num_classes=5, bn_size=2)


def tiny_sdxl_unet() -> nn.Module:  # SDXL's "text_time" added conditioning
    return tiny_unet(addition_embed_type="text_time", addition_time_embed_dim=4,
                     projection_class_embeddings_input_dim=4 * 6 + 8)


def tiny_unet2d() -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def tiny_dit() -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def tiny_sd3() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)


def tiny_flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))


# family -> (factory, input kind); "slow" families are marked slow in the matrix
ZOO = {
    "vit": (tiny_vit, "image"),
    "deit-distilled": (tiny_deit_distilled, "image"),
    "deit3": (_vit(init_values=1e-5, no_embed_class=True), "image"),
    "dinov2-reg": (_vit(reg_tokens=2, init_values=1e-5, no_embed_class=True), "image"),
    "clip": (_vit(pre_norm=True), "image"),
    "siglip": (_vit(class_token=False, global_pool="map"), "image"),
    "vit-gap": (_vit(class_token=False, global_pool="avg", fc_norm=True), "image"),
    "flexivit": (_vit(dynamic_img_size=True), "image"),
    "eva02": (_timm("eva02_tiny_patch14_224", **_TINY_VIT), "image"),
    "eva": (_timm("eva_giant_patch14_224", **_TINY_VIT), "image"),
    "beit": (_timm("beit_base_patch16_224", **_TINY_VIT), "image"),
    "sam-vit": (_timm("samvit_base_patch16", **_TINY_VIT, global_attn_indexes=(1,), window_size=2,
                      neck_chans=16, global_pool="avg"), "image"),
    "swin": (_timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4, embed_dim=16,
                   depths=(1, 1), num_heads=(1, 2)), "image"),
    "swinv2": (_timm("swinv2_tiny_window8_256", img_size=32, patch_size=4, window_size=4, embed_dim=16,
                     depths=(1, 1), num_heads=(1, 2)), "image"),
    "maxvit": (lambda: tiny_maxxvit(("M", "M")), "image"),
    "coatnet": (lambda: tiny_maxxvit(("C", "T")), "image"),
    "resnet": (tiny_resnet, "image"),
    "resnetv2": (tiny_resnetv2, "image"),
    "seresnet": (tiny_seresnet, "image"),
    "convnext": (_timm("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)), "image"),
    "convnextv2": (_timm("convnextv2_atto", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)), "image"),
    "efficientnet": (tiny_efficientnet, "image"),
    "mobilenetv3": (lambda: tiny_efficientnet(mobilenet=True), "image"),
    "regnet": (tiny_regnet, "image"),
    "densenet": (tiny_densenet, "image"),
    "unet": (tiny_unet, "unet"),
    "sdxl-unet": (tiny_sdxl_unet, "sdxl"),
    "unet2d": (tiny_unet2d, "unet2d"),
    "dit": (tiny_dit, "dit"),
    "sd3": (tiny_sd3, "sd3"),
    "flux": (tiny_flux, "flux"),
}


def zoo_model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO[family][0]()


def zoo_inputs(family: str, seed: int = 1) -> dict:
    """Keyword inputs of the family's forward (fixed by the seed)."""
    g = torch.Generator().manual_seed(seed)
    kind = ZOO[family][1]

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    t = torch.tensor([10, 500])
    if kind == "image":
        return {"x": randn(BATCH, 3, 32, 32)}
    if kind in ("unet", "sdxl"):
        kw = {"sample": randn(BATCH, 4, 8, 8), "timestep": t, "encoder_hidden_states": randn(BATCH, 3, 16)}
        if kind == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": randn(BATCH, 8), "time_ids": randn(BATCH, 6)}
        return kw
    if kind == "unet2d":
        return {"sample": randn(BATCH, 3, 8, 8), "timestep": t}
    if kind == "dit":
        return {"hidden_states": randn(BATCH, 4, 8, 8), "timestep": t, "class_labels": torch.tensor([1, 2])}
    if kind == "sd3":
        return {"hidden_states": randn(BATCH, 4, 8, 8), "encoder_hidden_states": randn(BATCH, 3, 16),
                "pooled_projections": randn(BATCH, 8), "timestep": t}
    return {"hidden_states": randn(BATCH, 16, 8), "encoder_hidden_states": randn(BATCH, 3, 16),  # flux
            "pooled_projections": randn(BATCH, 8), "timestep": t.float() / 1000,
            "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(3, 3)}


def zoo_run(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out.sample if hasattr(out, "sample") else out
