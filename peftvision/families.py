"""The model families peftvision ships registrations for (see architectures.py).

Default placements follow each method's paper where it covers the family; elsewhere the
natural equivalent, noted beside it. Names are regular expressions over full module names.

- LoRA: the attention input projections (fused qkv, or q/k/v/out in diffusers); CNNs: the
  convs of each residual block (as for ResNet).
- SSF: the paper's sites (after patch embedding, each block's linears and norms, final norm)
  on ViTs, Swin and ConvNeXt; after every norm on CNNs (on timm's norm+act layers, between the
  norm and its activation, so it still merges into the norm); MaxViT / CoAtNet and diffusers
  UNets combine the two: after every norm and after the attention and MLP linears.
- TSA: beside each conv of a residual block (1x1 convs where the block's kxk is depthwise).
- AdaptFormer: beside every transformer MLP (timm ViT blocks: the paper's pre-norm branch;
  other blocks: the branch reads the MLP's input).
- IA3 ({"outputs": ..., "inputs": ...}): k/v projection outputs (the k, v thirds of a fused qkv)
  and the MLP hidden activation (the input of its second Linear); CNNs: block conv outputs.
  EVA and BEiT add their own q/v bias to qkv, so only their MLP activation is rescaled.
- VPT: timm VisionTransformer token sequences, and Swin (v1, v2) windows as in the VPT paper's
  Swin variant (methods/vpt_swin.py); EVA's rotary and BEiT's relative position tables fix the
  sequence length, SAM's and MaxViT's windows are not covered by the paper.
- Attention tuning: the attention modules. DiffFit: diffusers BasicTransformerBlocks (SD UNets,
  DiT), SD3's JointTransformerBlocks and Flux's double- and single-stream blocks.
"""

from __future__ import annotations

from torch import nn

from .architectures import Architecture, register_architecture

TIMM_VIT = "timm.models.vision_transformer"
_TSA = "TSA adapts residual conv blocks (CNNs); pass targets=[...] for convs here"
_WINDOWS = ("its attention runs on a 2-D token grid (windows), not a sequence prompts can extend; "
            "VPT's per-window prompts are implemented for Swin's (shifted) windows only")


def _block_sites(block: str, qkv: bool = True) -> dict[str, object]:
    """Placements of a timm pre-norm transformer whose blocks match `block` (qkv: the fused qkv
    Linear may be adapted; EVA and BEiT read qkv.weight themselves, so SSF and IA3 skip it)."""
    ssf_qkv = "|attn\\.qkv" if qkv else ""
    return {
        "lora": rf"{block}\.attn\.qkv",
        "ssf": rf"patch_embed\.proj|{block}\.(norm1{ssf_qkv}|attn\.proj|norm2|mlp\.(fc1|fc1_g|fc1_x|fc2))"
               r"|norm|fc_norm",
        "attention": rf"{block}\.attn",
        "adaptformer": rf"{block}\.mlp",
        "ia3": {"outputs": rf"{block}\.attn\.qkv" if qkv else None, "inputs": rf"{block}\.mlp\.fc2"},
    }


VIT = _block_sites(r"blocks\.\d+")
register_architecture(Architecture(
    "vit", classes=((TIMM_VIT, "VisionTransformer"),),
    placements={**VIT, "adaptformer": r"blocks\.\d+", "vpt": True},
    refusals={"tsa": _TSA, "difffit": "DiffFit's scales sit in diffusers transformer blocks"},
    traits=frozenset({"qkv-thirds", "norm", "tokens", "classifier", "layernorm", "attention"}),
    description="timm VisionTransformer and its variants: DeiT (incl. distilled), DeiT3, DINOv2 "
                "(registers), CLIP, SigLIP, FlexiViT, global-pool / no-class-token ViTs"))

register_architecture(Architecture(
    "eva", classes=(("timm.models.eva", "Eva"),), placements=_block_sites(r"blocks\.\d+", qkv=False),
    refusals={"vpt": "EVA's rotary position embedding covers exactly the patch tokens", "tsa": _TSA},
    traits=frozenset({"qkv-thirds", "norm", "classifier", "layernorm", "attention"}), description="timm EVA, EVA02"))

register_architecture(Architecture(
    "beit", classes=(("timm.models.beit", "Beit"),), placements=_block_sites(r"blocks\.\d+", qkv=False),
    refusals={"vpt": "BEiT's relative position bias tables fix the number of tokens", "tsa": _TSA},
    traits=frozenset({"qkv-thirds", "norm", "classifier", "layernorm", "attention"}), description="timm BEiT"))

register_architecture(Architecture(
    "sam-vit", classes=(("timm.models.vision_transformer_sam", "VisionTransformerSAM"),),
    placements=_block_sites(r"blocks\.\d+"), refusals={"vpt": _WINDOWS, "tsa": _TSA},
    traits=frozenset({"qkv-thirds", "norm", "classifier", "layernorm", "attention"}),
    description="timm SAM image encoder (VisionTransformerSAM)"))

def _swin(method: str):
    """Swin v2's attention reads qkv.weight itself (F.linear with its own q/v biases), as EVA."""
    def placement(model: nn.Module):
        sites = _block_sites(r"layers\.\d+\.blocks\.\d+", qkv=type(model).__name__ == "SwinTransformer")
        extra = r"|patch_embed\.norm|layers\.\d+\.downsample\.(norm|reduction)" if method == "ssf" else ""
        return sites[method] if method == "ia3" else sites[method] + extra

    return placement


register_architecture(Architecture(
    "swin",
    classes=(("timm.models.swin_transformer", "SwinTransformer"),
             ("timm.models.swin_transformer_v2", "SwinTransformerV2")),
    placements={**{m: _swin(m) for m in ("lora", "ssf", "attention", "adaptformer", "ia3")},
                "vpt": True},  # the VPT paper's Swin variant: prompts in every window (vpt_swin.py)
    refusals={"tsa": _TSA},
    traits=frozenset({"qkv-thirds", "norm", "classifier", "layernorm", "attention"}), description="timm Swin v1, v2"))

_MAXXVIT_BLOCK = r"stages\.\d+\.blocks\.\d+"
_MBCONV = rf"{_MAXXVIT_BLOCK}(\.conv)?\.(conv1_1x1|conv3_1x1)"
register_architecture(Architecture(
    "maxvit", classes=(("timm.models.maxxvit", "MaxxVit"),),
    placements={
        "lora": rf"{_MAXXVIT_BLOCK}(\.attn_block|\.attn_grid)?\.attn\.qkv",
        "attention": rf"{_MAXXVIT_BLOCK}(\.attn_block|\.attn_grid)?\.attn",
        "adaptformer": rf"{_MAXXVIT_BLOCK}(\.attn_block|\.attn_grid)?\.mlp",
        # MaxxVit's qkv interleaves q, k, v per head: IA3 leaves it (and LoRA adapts all of it)
        "ia3": {"outputs": _MBCONV,
                "inputs": rf"{_MAXXVIT_BLOCK}(\.attn_block|\.attn_grid)?\.mlp\.fc2"},
        "tsa": _MBCONV,
        # SSF as on ViTs in the attention blocks, and after every norm (as on CNNs) in the MBConvs
        "ssf": [nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
    },
    traits=frozenset({"norm", "classifier", "batchnorm", "layernorm", "attention"}),
    refusals={"vpt": _WINDOWS},
    description="timm MaxViT, CoAtNet (MaxxVit)"))

# ---- CNNs --------------------------------------------------------------------------------------

_NORMS = [nn.modules.batchnorm._BatchNorm, nn.GroupNorm]


def _cnn(name: str, classes, block_convs: str, description: str, *, ssf=None, traits=("batchnorm",)):
    register_architecture(Architecture(
        name, classes=classes,
        placements={"lora": block_convs, "tsa": block_convs, "ia3": {"outputs": block_convs},
                    "ssf": ssf if ssf is not None else list(_NORMS)},
        traits=frozenset({"norm", "classifier", *traits}), description=description,
        refusals={"vpt": "prompt tokens need a transformer's token sequence",
                  "adaptformer": "AdaptFormer sits beside transformer MLPs",
                  "difffit": "DiffFit's scales sit in diffusers transformer blocks"}))


_cnn("resnet", (("timm.models.resnet", "ResNet"),), r"layer\d+\.\d+\.conv\d+",
     "timm ResNet, ResNet-D, SE-ResNet, ResNeXt", ssf=[nn.modules.batchnorm._BatchNorm])
_cnn("resnetv2", (("timm.models.resnetv2", "ResNetV2"),), r"stages\.\d+\.blocks\.\d+\.conv\d+",
     "timm ResNetV2 / BiT (StdConv2d, GroupNorm)", traits=())
_cnn("convnext", (("timm.models.convnext", "ConvNeXt"),), r"stages\.\d+\.blocks\.\d+\.mlp\.fc[12]",
     "timm ConvNeXt v1, v2 (1x1 MLP convs; the 7x7 is depthwise)",
     ssf=r"stem\.\d+|stages\.\d+\.downsample\.\d+|stages\.\d+\.blocks\.\d+\.(conv_dw|norm|mlp\.fc1|mlp\.fc2)"
         r"|norm_pre|head\.norm", traits=("layernorm",))
_cnn("efficientnet", (("timm.models.efficientnet", "EfficientNet"), ("timm.models.mobilenetv3", "MobileNetV3")),
     r"blocks\.\d+\.\d+\.(conv_pw|conv_pwl)", "timm EfficientNet, MobileNetV3 (pointwise convs)")
_cnn("regnet", (("timm.models.regnet", "RegNet"),), r"s\d+\.b\d+\.conv[13]\.conv",
     "timm RegNet (1x1 convs; the 3x3 is grouped)")
_cnn("densenet", (("timm.models.densenet", "DenseNet"),),
     r"features\.denseblock\d+\.denselayer\d+\.conv\d+", "timm DenseNet")

# ---- diffusers ---------------------------------------------------------------------------------

# DiT, SD3 and Flux normalise with affine-free LayerNorms (ada-norm): no "layernorm"/"norm" trait
_DIFFUSERS_TRAITS = frozenset({"diffusers", "attention"})
_DIFFUSION_REFUSALS = {
    "vpt": "prompt tokens are defined for classification ViTs",
    "ssf": "the ada-norm blocks' norms have no affine parameters for SSF to fold into; pass "
           "targets=[...] (e.g. [nn.Linear]) to place it",
    "tsa": "TSA's paper covers classification ResNets; pass targets=[...] (e.g. resnets' convs)",
}
_UNET_ATTN = r".*\.attn\d+\.(to_q|to_k|to_v|to_out\.0)"
# SSF on a UNet: after every norm (GroupNorm, LayerNorm: the CNN rule, each conv is followed by
# one) and after the attention and feed-forward linears (the ViT rule)
_UNET_SSF = [nn.GroupNorm, nn.LayerNorm, "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
             "proj_in", "proj_out"]
register_architecture(Architecture(
    "unet", classes=(("diffusers.models.unets.unet_2d_condition", "UNet2DConditionModel"),),
    placements={"lora": _UNET_ATTN, "attention": r".*attentions\.\d+", "difffit": True, "ssf": _UNET_SSF,
                "ia3": {"outputs": r".*\.attn\d+\.(to_k|to_v)", "inputs": r".*\.ff\.net\.2"}},
    traits=_DIFFUSERS_TRAITS | {"layernorm", "norm"}, refusals=_DIFFUSION_REFUSALS,
    description="diffusers UNet2DConditionModel: SD 1.x, 2.x, SDXL (text_time conditioning)"))

register_architecture(Architecture(
    "unet2d", classes=(("diffusers.models.unets.unet_2d", "UNet2DModel"),),
    placements={"lora": r".*attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)", "attention": r".*attentions\.\d+",
                "ia3": {"outputs": r".*attentions\.\d+\.(to_k|to_v)"}, "tsa": r".*resnets\.\d+\.conv[12]",
                "ssf": _UNET_SSF},
    traits=frozenset({"diffusers", "attention", "norm"}), description="diffusers UNet2DModel (DDPM)",
    refusals={**_DIFFUSION_REFUSALS, "difffit": "UNet2DModel has no transformer blocks"}))

_DIT_BLOCK = r"transformer_blocks\.\d+"
register_architecture(Architecture(
    "dit",
    classes=(("diffusers.models.transformers.dit_transformer_2d", "DiTTransformer2DModel"),
             ("diffusers.models.transformers.transformer_2d", "Transformer2DModel")),
    placements={"lora": rf"{_DIT_BLOCK}\.attn\d\.(to_q|to_k|to_v|to_out\.0)", "attention": rf"{_DIT_BLOCK}\.attn\d",
                "adaptformer": rf"{_DIT_BLOCK}\.ff", "difffit": True,
                "ia3": {"outputs": rf"{_DIT_BLOCK}\.attn\d\.(to_k|to_v)", "inputs": rf"{_DIT_BLOCK}\.ff\.net\.2"}},
    traits=_DIFFUSERS_TRAITS, refusals=_DIFFUSION_REFUSALS, description="diffusers DiT / Transformer2DModel"))

_MMDIT_ATTN = r"(single_)?transformer_blocks\.\d+\.attn"
_MMDIT = {
    "lora": rf"{_MMDIT_ATTN}\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
    "attention": _MMDIT_ATTN,
    "adaptformer": rf"{_DIT_BLOCK}\.(ff|ff_context)",
    "ia3": {"outputs": rf"{_MMDIT_ATTN}\.(to_k|to_v|add_k_proj|add_v_proj)",
            "inputs": rf"{_DIT_BLOCK}\.(ff|ff_context)\.net\.2"},
    "difffit": True,  # its own block finder (methods/difffit.py): joint and single-stream blocks
}
register_architecture(Architecture(
    "sd3", classes=(("diffusers.models.transformers.transformer_sd3", "SD3Transformer2DModel"),),
    placements=_MMDIT, traits=_DIFFUSERS_TRAITS, refusals=_DIFFUSION_REFUSALS,
    description="diffusers SD3Transformer2DModel (MMDiT)"))
register_architecture(Architecture(
    "flux", classes=(("diffusers.models.transformers.transformer_flux", "FluxTransformer2DModel"),),
    placements=_MMDIT, traits=_DIFFUSERS_TRAITS, refusals=_DIFFUSION_REFUSALS,
    description="diffusers FluxTransformer2DModel"))
