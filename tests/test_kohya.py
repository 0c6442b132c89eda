"""kohya-ss / A1111 / LyCORIS single-file adapters: loading against diffusers' own loader and
the LyCORIS formulas, saving files diffusers loads, and refusals that leave the model as it was.

Files are built offline: LoRA / LoCon from a peft LoRA on a tiny UNet converted with diffusers'
convert_state_dict_to_kohya; LoHa / LoKr by hand with LyCORIS' key names and shapes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from models import make_inputs, run, tiny_unet
from torch import nn

import peftvision as pv
from peftvision.errors import AdapterLoadError, ConfigError, CorruptAdapterError
from peftvision.state import get_adapters

pytest.importorskip("diffusers")
pytest.importorskip("peft")

ATTN = ["to_q", "to_v"]
CONVS = ["conv1", "conv_in", "proj_in"]  # 3x3 resnet convs, the stem conv, 1x1 proj_in (LoCon)
TOL = dict(rtol=1e-5, atol=1e-5)


def _save(path, tensors: dict) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def _tiny_te() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    return CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=100, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))


def _te_out(te: nn.Module) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 17, 42, 1], [0, 9, 3, 1, 1]])
    with torch.no_grad():
        return te(ids).last_hidden_state


def _peft_kohya(model: nn.Module, targets, prefix: str, rank_pattern=None, seed=0) -> dict:
    """A peft LoRA (random, non-zero B) on a copy of `model`, in kohya's layout via diffusers."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(model)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets,
                                       rank_pattern=rank_pattern or {}), model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    state = get_peft_model_state_dict(model)
    return convert_state_dict_to_kohya({f"{prefix}.{k}": v for k, v in state.items()})


def _diffusers_unet(base: nn.Module, path: str) -> nn.Module:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    ref = copy.deepcopy(base)
    state, alphas = Loader.lora_state_dict(path)
    Loader.load_lora_into_unet(state, alphas, unet=ref)
    return ref


def _formula(base: nn.Module, tensors: dict, prefix: str = "lora_unet_") -> nn.Module:
    """`base` with every file layer's ΔW added to its weight, computed here from the LyCORIS /
    kohya formulas (alpha/r per layer; LoKr's scale 1 when no factor is low rank)."""
    model = copy.deepcopy(base)
    modules = {n.replace(".", "_"): m for n, m in model.named_modules()}
    layers: dict[str, dict] = {}
    for key, t in tensors.items():
        name, _, suffix = key.partition(".")
        if name.startswith(prefix):
            layers.setdefault(name[len(prefix):], {})[suffix] = t.float()
    with torch.no_grad():
        for name, f in layers.items():
            weight = (modules.get(name) or modules[name.removeprefix("text_model_")]).weight
            if "lora_down.weight" in f:
                down, up = f["lora_down.weight"], f["lora_up.weight"]
                r, delta = down.shape[0], up.flatten(1) @ down.flatten(1)
            elif "hada_w1_a" in f:
                r = f["hada_w1_b"].shape[0]
                delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
            else:
                w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
                w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
                low = [k for k in ("lokr_w2_b", "lokr_w1_b") if k in f]
                r = f[low[0]].shape[0] if low else None
                if weight.dim() == 4:  # kron over (out, in) with the kernel inside W2
                    w2 = w2.reshape(w2.shape[0], -1, *weight.shape[2:])
                    delta = torch.kron(w1[:, :, None, None], w2)
                else:
                    delta = torch.kron(w1, w2)
            alpha = float(f["alpha"]) if "alpha" in f and r is not None else r
            scale = 1.0 if r is None else alpha / r
            weight += (delta * scale).reshape(weight.shape)
    return model


def _out(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return run(model, inputs)


@pytest.fixture(scope="module")
def base() -> nn.Module:
    torch.manual_seed(0)
    return tiny_unet()


@pytest.fixture(scope="module")
def inputs():
    return make_inputs("unet")


def _locon_file(base: nn.Module, tmp_path, conv_alphas=(1.0, 3.0)) -> tuple[str, dict]:
    """LoRA r=4 on attention, LoCon r=2 on convs; alpha 2 on attention, `conv_alphas` on convs."""
    tensors = _peft_kohya(base, ATTN + CONVS, "unet", rank_pattern={c: 2 for c in CONVS})
    for i, key in enumerate(sorted(k for k in tensors if k.endswith(".alpha"))):
        conv = any(k in key for k in ("conv", "proj_in"))
        tensors[key] = torch.tensor(conv_alphas[i % len(conv_alphas)] if conv else 2.0)
    return _save(tmp_path / "locon.safetensors", tensors), tensors


def test_kohya_lora_and_locon_give_diffusers_outputs(base, inputs, tmp_path):
    path, tensors = _locon_file(base, tmp_path)
    ours = pv.load_adapter(copy.deepcopy(base), path)
    got, want = _out(ours, inputs), _out(_diffusers_unet(base, path), inputs)
    assert (want - _out(base, inputs)).abs().max() > 1e-2  # the LoRA changes the output
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got, _out(_formula(base, tensors), inputs), **TOL)
    kinds = {type(m).__name__ for m in ours.modules() if isinstance(m, pv.layers.Adapter)}
    assert kinds == {"LoRALinear", "LoRAConv"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_layer_alpha_and_rank_follow_kohya(base, inputs, tmp_path, dtype):
    """Every layer's own alpha/r, on attention too (diffusers applies only the most common alpha
    to attention layers, whose keys its alpha mapping misses), so the reference is the formula.
    fp16 files (the usual download) fold their alphas in fp32."""
    tensors = _peft_kohya(base, ATTN + CONVS, "unet", rank_pattern={"conv1": 1, "to_v": 3})
    for i, key in enumerate(sorted(k for k in tensors if k.endswith(".alpha"))):
        tensors[key] = torch.tensor([4.0, 1.0, 6.0, 0.5][i % 4])
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    path = _save(tmp_path / "mixed.safetensors", tensors)
    ours = pv.load_adapter(copy.deepcopy(base), path)
    torch.testing.assert_close(_out(ours, inputs), _out(_formula(base, tensors), inputs), **TOL)
    (lora,) = pv.state.require_state(ours, "test").methods
    assert lora.r == 4  # smaller ranks zero-padded to the largest


@pytest.mark.parametrize("options", [dict(use_rslora=True), dict(init="pissa")])
def test_save_kohya_is_loaded_by_diffusers_with_our_outputs(base, inputs, tmp_path, options):
    # rsLoRA: alpha/sqrt(r) written as a per-layer alpha; PiSSA: its frozen offset as rank 2r
    model = pv.apply(copy.deepcopy(base), "lora", r=4, alpha=8.0, targets=ATTN + ["conv1", "conv_in"],
                     **options)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    path = tmp_path / "ours.safetensors"
    assert pv.save_adapter(model, path, format="kohya") == path
    want = _out(model, inputs)
    torch.testing.assert_close(_out(_diffusers_unet(base, str(path)), inputs), want, **TOL)
    torch.testing.assert_close(_out(pv.load_adapter(copy.deepcopy(base), path), inputs), want, **TOL)


def _lycoris_loha(base: nn.Module, seed=0) -> dict:
    """LoHa on a Linear (rank 2), a 3x3 conv (rank 3) and a 1x1 conv, alphas differing."""
    g = torch.Generator().manual_seed(seed)
    layers = {"down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (2, 1.0),
              "down_blocks_0_resnets_0_conv1": (3, 6.0),
              "up_blocks_1_attentions_0_proj_in": (2, None)}  # no alpha: alpha = r
    modules = {n.replace(".", "_"): m for n, m in base.named_modules()}
    tensors = {}
    for name, (r, alpha) in layers.items():
        w = modules[name].weight  # (out, in[, k, k])
        key = f"lora_unet_{name}"
        for pair in ("w1", "w2"):
            tensors[f"{key}.hada_{pair}_a"] = torch.randn(w.shape[0], r, generator=g) * 0.3
            tensors[f"{key}.hada_{pair}_b"] = torch.randn(r, w[0].numel(), generator=g) * 0.3
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


def test_lycoris_loha_matches_the_lycoris_formula(base, inputs, tmp_path):
    # diffusers' SD loader does not read LoHa files: the reference is LyCORIS' ΔW added by hand
    tensors = _lycoris_loha(base)
    ours = pv.load_adapter(copy.deepcopy(base), _save(tmp_path / "loha.safetensors", tensors))
    torch.testing.assert_close(_out(ours, inputs), _out(_formula(base, tensors), inputs), **TOL)
    # and back out: our file has the same function
    out = tmp_path / "loha_again.safetensors"
    pv.save_adapter(ours, out, format="kohya")
    from safetensors.torch import load_file

    torch.testing.assert_close(_out(_formula(base, load_file(str(out))), inputs), _out(ours, inputs), **TOL)


@pytest.mark.parametrize("linear", [True, False])
def test_proj_in_loras_load_across_conv_and_linear_projections(inputs, tmp_path, linear):
    """SD 1 keeps proj_in as a 1x1 conv, SD 2 (use_linear_projection) as a Linear: a file made
    for one loads onto the other."""
    torch.manual_seed(0)
    base = tiny_unet(use_linear_projection=linear)
    g = torch.Generator().manual_seed(4)
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    ones = (1, 1) if linear else ()  # the file has the other layout
    tensors = {f"{key}.lora_down.weight": torch.randn(2, 16, *ones, generator=g),
               f"{key}.lora_up.weight": torch.randn(16, 2, *ones, generator=g), f"{key}.alpha": torch.tensor(1.0)}
    ours = pv.load_adapter(copy.deepcopy(base), _save(tmp_path / "sd1.safetensors", tensors))
    torch.testing.assert_close(_out(ours, inputs), _out(_formula(base, tensors), inputs), **TOL)


def _lycoris_lokr(decompose_both: bool, seed=0) -> dict:
    """LyCORIS' LoKr layout at lora_dim 3, factor -1: to_q (16 -> 16) keeps both factors full
    (alpha then unused), ff.net.0.proj (16 -> 128) and a 3x3 conv (16 -> 32) have W2 low rank."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    ff = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"
    conv = "lora_unet_down_blocks_1_resnets_0_conv1"
    tensors = {f"{q}.lokr_w1": rand(4, 4), f"{q}.lokr_w2": rand(4, 4), f"{q}.alpha": torch.tensor(7.0),
               f"{ff}.lokr_w2_a": rand(16, 3), f"{ff}.lokr_w2_b": rand(3, 4), f"{ff}.alpha": torch.tensor(1.5),
               f"{conv}.lokr_w1": rand(4, 4), f"{conv}.lokr_w2_a": rand(8, 3),
               f"{conv}.lokr_w2_b": rand(3, 4 * 9), f"{conv}.alpha": torch.tensor(6.0)}
    if decompose_both:  # W1 (8, 4) of ff is low rank too: 3 < max(8, 4) / 2
        tensors.update({f"{ff}.lokr_w1_a": rand(8, 3), f"{ff}.lokr_w1_b": rand(3, 4)})
    else:
        tensors[f"{ff}.lokr_w1"] = rand(8, 4)
    return tensors


@pytest.mark.parametrize("decompose_both", [False, True])
def test_lycoris_lokr_matches_the_lycoris_formula(base, inputs, tmp_path, decompose_both):
    tensors = _lycoris_lokr(decompose_both)
    ours = pv.load_adapter(copy.deepcopy(base), _save(tmp_path / "lokr.safetensors", tensors))
    want = _out(_formula(base, tensors), inputs)
    torch.testing.assert_close(_out(ours, inputs), want, **TOL)
    (lokr,) = pv.state.require_state(ours, "test").methods
    assert (lokr.r, lokr.factor, lokr.decompose_both) == (3, -1, decompose_both)
    out = tmp_path / "lokr_again.safetensors"
    pv.save_adapter(ours, out, format="kohya")
    from safetensors.torch import load_file

    torch.testing.assert_close(_out(_formula(base, load_file(str(out))), inputs), want, **TOL)


def test_text_encoder_layers_are_reported_and_skipped_or_loaded(base, inputs, tmp_path):
    te = _tiny_te()
    tensors = _peft_kohya(base, ATTN, "unet")
    te_tensors = _peft_kohya(te, ["q_proj", "v_proj", "fc1"], "text_encoder", seed=1)
    # kohya names CLIP's modules from text_model (transformers < 5 nests them there)
    te_tensors = {k.replace("lora_te1_", "lora_te_text_model_"): v for k, v in te_tensors.items()}
    path = _save(tmp_path / "both.safetensors", {**tensors, **te_tensors})
    n_te = len({k.split(".")[0] for k in te_tensors})
    with pytest.warns(UserWarning, match=f"skipped {n_te} text_encoder layer"):
        unet_only = pv.load_adapter(copy.deepcopy(base), path)
    torch.testing.assert_close(_out(unet_only, inputs), _out(_diffusers_unet(base, path), inputs), **TOL)
    unet, te_loaded = copy.deepcopy(base), copy.deepcopy(te)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped now
        pv.load_adapter(unet, path, text_encoder=te_loaded)
    torch.testing.assert_close(_out(unet, inputs), _out(unet_only, inputs), **TOL)
    want = _te_out(_formula(te, te_tensors, prefix="lora_te_"))
    assert (want - _te_out(te)).abs().max() > 1e-3
    torch.testing.assert_close(_te_out(te_loaded), want, **TOL)
    # and saved back with both parts: the same functions again
    out = tmp_path / "both_again.safetensors"
    pv.save_adapter(unet, out, format="kohya", text_encoder=te_loaded)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:  # A1111's / kohya's CLIP names, whatever transformers builds
        assert {k.split(".")[0] for k in f.keys() if k.startswith("lora_te")} == {
            k.split(".")[0] for k in te_tensors}
    unet2, te2 = copy.deepcopy(base), copy.deepcopy(te)
    pv.load_adapter(unet2, out, text_encoder=te2)
    torch.testing.assert_close(_te_out(te2), want, **TOL)
    torch.testing.assert_close(_out(unet2, inputs), _out(unet, inputs), **TOL)


def _unchanged(model: nn.Module, base: nn.Module, inputs) -> None:
    assert get_adapters(model) is None
    assert list(model.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(_out(model, inputs), _out(base, inputs), rtol=0, atol=0)


def _bad_files(base: nn.Module) -> dict:
    tensors = _peft_kohya(base, ATTN, "unet")
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    layer = key.split(".")[0]
    rank = tensors[key].shape[1]
    return {
        "unknown keys": ({**tensors, "unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3)}, AdapterLoadError),
        "Tucker conv core": ({**tensors, f"{layer}.hada_t1": torch.zeros(2, 2, 3, 3)}, AdapterLoadError),
        "lacks lora_up": ({k: v for k, v in tensors.items() if k != key}, CorruptAdapterError),
        "different ranks": ({**tensors, key: torch.zeros(tensors[key].shape[0], rank + 1)}, CorruptAdapterError),
        "name no Linear": ({**tensors, "lora_unet_nowhere_0.lora_down.weight": torch.zeros(4, 16),
                            "lora_unet_nowhere_0.lora_up.weight": torch.zeros(16, 4)}, AdapterLoadError),
        "SGM / LDM": ({**tensors, "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 16),
                       "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(16, 4)}, AdapterLoadError),
        "does not fit": ({**tensors, key: torch.zeros(tensors[key].shape[0] + 1, rank)}, AdapterLoadError),
        "must be one number": ({**tensors, f"{layer}.alpha": torch.ones(2)}, CorruptAdapterError),
    }


@pytest.mark.parametrize("problem", ["unknown keys", "Tucker conv core", "lacks lora_up", "different ranks",
                                     "name no Linear", "SGM / LDM", "does not fit", "must be one number"])
def test_bad_files_are_refused_and_leave_the_model_as_it_was(base, inputs, tmp_path, problem):
    tensors, error = _bad_files(base)[problem]
    path = _save(tmp_path / "bad.safetensors", tensors)
    model = copy.deepcopy(base)
    with pytest.raises(error, match=problem):
        pv.load_adapter(model, path)
    _unchanged(model, base, inputs)


def test_corrupt_and_foreign_files_are_refused(base, inputs, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    model = copy.deepcopy(base)
    with pytest.raises(CorruptAdapterError, match="truncated or corrupt"):
        pv.load_adapter(model, path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"0")
    with pytest.raises(AdapterLoadError, match="single .safetensors"):
        pv.load_adapter(model, other)
    _unchanged(model, base, inputs)


def test_a_text_encoder_failure_takes_the_unet_adapter_back(base, inputs, tmp_path):
    te = _tiny_te()
    tensors = {**_peft_kohya(base, ATTN, "unet"),
               "lora_te_text_model_encoder_layers_9_mlp_fc1.lora_down.weight": torch.zeros(2, 16),
               "lora_te_text_model_encoder_layers_9_mlp_fc1.lora_up.weight": torch.zeros(32, 2)}
    path = _save(tmp_path / "bad_te.safetensors", tensors)
    model, te_model = copy.deepcopy(base), copy.deepcopy(te)
    with pytest.raises(AdapterLoadError, match="text encoder"):
        pv.load_adapter(model, path, text_encoder=te_model)
    _unchanged(model, base, inputs)
    assert get_adapters(te_model) is None


def test_hotswap_replaces_the_weights_of_a_kohya_adapter(base, inputs, tmp_path):
    first = _save(tmp_path / "a.safetensors", _peft_kohya(base, ATTN, "unet", seed=1))
    second = _save(tmp_path / "b.safetensors", _peft_kohya(base, ATTN, "unet", seed=2))
    model = pv.load_adapter(copy.deepcopy(base), first)
    pv.load_adapter(model, second, adapter_name="default", hotswap=True)
    torch.testing.assert_close(_out(model, inputs), _out(pv.load_adapter(copy.deepcopy(base), second), inputs),
                               **TOL)


@pytest.mark.parametrize("case", ["dora", "other method", "not a file name", "not a unet"])
def test_save_kohya_refuses_what_the_format_cannot_hold(base, tmp_path, case):
    from models import tiny_vit

    path = tmp_path / "x.safetensors"
    if case == "dora":
        model, match = pv.apply(copy.deepcopy(base), "lora", r=2, use_dora=True, targets=ATTN), "DoRA"
    elif case == "other method":
        model, match = pv.apply(copy.deepcopy(base), [pv.config("lora", r=2, targets=ATTN), "bias"]), "bias"
    elif case == "not a file name":
        model, match, path = pv.apply(copy.deepcopy(base), "lora", r=2, targets=ATTN), "ending in", tmp_path
    else:
        model, match = pv.apply(tiny_vit(), "lora", r=2), "UNet"
    with pytest.raises((ConfigError, ValueError), match=match):
        pv.save_adapter(model, path, format="kohya")
    assert not (tmp_path / "x.safetensors").exists()


def test_text_encoder_arguments_belong_to_the_single_file_format(base, tmp_path):
    te = _tiny_te()
    with pytest.raises(ValueError, match="single-file"):
        pv.load_adapter(copy.deepcopy(base), tmp_path, text_encoder=te)
    model = pv.apply(copy.deepcopy(base), "lora", r=2, targets=ATTN)
    with pytest.raises(ValueError, match="format='kohya'"):
        pv.save_adapter(model, tmp_path / "peft", format="peft", text_encoder=te)
    assert get_adapters(te) is None and not (tmp_path / "peft").exists()
