"""Loading a kohya-format LoRA / LoCon file onto the SD-1.5 UNet: peftvision vs diffusers, one run.

    python -m benchmarks.perf.kohya_load                 # SD-1.5 UNet (random weights, seeded)
    python -m benchmarks.perf.kohya_load --tiny --reps 1 # smoke test, seconds
    python -m benchmarks.perf.kohya_load --out FILE.json

The file is a typical community LoCon: LoRA r=32, alpha 16 on every attention projection,
proj_in / proj_out and feed-forward Linear; LoCon r=8, alpha 1 on the resnets' 3x3 convs; random
factors, written in kohya's layout by diffusers' convert_state_dict_to_kohya. Timed on the same
UNet: `pv.load_adapter(unet, file)` (then unload) and diffusers'
`lora_state_dict` + `load_lora_into_unet` (then delete_adapters), each --reps times, medians
printed side by side. Outputs: one forward (batch 1, 32x32 latents, 77x768 text) with each
loaded; max |ours - diffusers| next to max |LoRA - base| (the LoRA's own effect), and the same
after `save_adapter(format="kohya")` and a diffusers load of that file.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import peftvision as pv

from .common import environment, git_sha, load_warning, write_json

ATTN = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def _unet(tiny: bool) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if tiny:
        return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
                                    attention_head_dim=8, norm_num_groups=8, sample_size=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return pv.create_model("sd15-unet")


def kohya_file(unet: torch.nn.Module, path: Path) -> int:
    """Write the LoCon file described above; returns its number of layers."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    peft_style, alphas = {}, {}
    for name, module in unet.named_modules():
        conv = isinstance(module, torch.nn.Conv2d) and ".resnets." in name and name.endswith(("conv1", "conv2"))
        if not (conv or isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(ATTN)):
            continue
        r, alpha = (8, 1.0) if conv else (32, 16.0)
        w = module.weight  # (out, in[, k, k])
        peft_style[f"unet.{name}.lora_A.weight"] = torch.randn(r, *w.shape[1:], generator=g) * 0.02
        peft_style[f"unet.{name}.lora_B.weight"] = torch.randn(w.shape[0], r, *([1] * (w.dim() - 2)),
                                                               generator=g) * 0.02
        alphas[name] = alpha
    kohya = convert_state_dict_to_kohya(peft_style)
    for name, alpha in alphas.items():  # diffusers writes alpha = r; use the file's own
        kohya[f"lora_unet_{name.replace('.', '_')}.alpha"] = torch.tensor(alpha)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path))
    return len(alphas)


def _diffusers_load(unet: torch.nn.Module, path: Path) -> None:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    state, alphas = Loader.lora_state_dict(str(path))
    Loader.load_lora_into_unet(state, alphas, unet=unet, adapter_name="bench")


def _forward(unet: torch.nn.Module, tiny: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    size, text = (8, (1, 3, 16)) if tiny else (32, (1, 77, 768))
    with torch.no_grad():
        return unet(torch.randn(1, 4, size, size, generator=g), torch.tensor([500]),
                    torch.randn(*text, generator=g)).sample


def run(tiny: bool, reps: int) -> dict:
    unet = _unet(tiny).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "locon.safetensors"
        layers = kohya_file(unet, path)
        file_mb = path.stat().st_size / 2**20
        base = _forward(unet, tiny)
        ours_s = []
        for _ in range(reps):
            t0 = time.perf_counter()
            pv.load_adapter(unet, path)
            ours_s.append(time.perf_counter() - t0)
            ours = _forward(unet, tiny)
            saved = Path(tmp) / "saved.safetensors"
            pv.save_adapter(unet, saved, format="kohya")
            pv.unload(unet)  # the user's weights back, exactly
        diffusers_s = []
        for _ in range(reps):
            t0 = time.perf_counter()
            _diffusers_load(unet, path)
            diffusers_s.append(time.perf_counter() - t0)
            theirs = _forward(unet, tiny)
            unet.delete_adapters("bench")
        reloaded = copy.deepcopy(unet) if tiny else unet  # the full UNet: reuse it (memory)
        _diffusers_load(reloaded, saved)
        theirs_saved = _forward(reloaded, tiny)
    return {"unet": "tiny" if tiny else "sd15", "layers": layers, "file_mb": round(file_mb, 1),
            "load_s": {"peftvision": statistics.median(ours_s), "diffusers": statistics.median(diffusers_s)},
            "max_abs_lora_effect": (ours - base).abs().max().item(),
            "max_abs_ours_vs_diffusers": (ours - theirs).abs().max().item(),
            "max_abs_saved_file_in_diffusers_vs_ours": (theirs_saved - ours).abs().max().item()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny UNet: a smoke test in seconds")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    load_warning(torch.get_num_threads())
    result = run(args.tiny, args.reps)
    ours, theirs = result["load_s"]["peftvision"], result["load_s"]["diffusers"]
    print(f"{result['layers']} layers, {result['file_mb']} MiB; load: peftvision {ours:.3f} s, "
          f"diffusers {theirs:.3f} s (ratio {ours / theirs:.2f}); max |LoRA - base| "
          f"{result['max_abs_lora_effect']:.3e}, max |ours - diffusers| {result['max_abs_ours_vs_diffusers']:.3e}, "
          f"our saved file in diffusers vs ours {result['max_abs_saved_file_in_diffusers_vs_ours']:.3e}")
    if args.out:
        write_json(args.out, {**result, "environment": environment(), "git_sha": git_sha()})
    return result


if __name__ == "__main__":
    main()
