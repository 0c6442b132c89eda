"""add_weighted_adapter next to peft's, on one model, same adapters, side by side in one run.

    python -m benchmarks.perf.mixing                      # ViT-B/16, two LoRAs (r=16, r=8)
    python -m benchmarks.perf.mixing --tiny --reps 1      # smoke test, seconds
    python -m benchmarks.perf.mixing --device cuda --out FILE.json

Two LoRA adapters on ViT-B/16's qkv and MLP (random, non-zero factors, the same in both
libraries; random base weights: the figures are about time and agreement, not accuracy) are
mixed with weights (0.7, 0.3) by every combination type. Per type and library it reports the
median wall time of `add_weighted_adapter` over --reps runs (each on a fresh pair of models),
the largest |difference| between the two libraries' mixed outputs on one
batch, and, for "svd", the relative Frobenius error of the mix's ΔW against the exact
Σ wᵢ·ΔWᵢ next to the best possible one at that rank (Eckart–Young, from the singular values).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import peftvision as pv

from .common import environment, median

WEIGHTS = [0.7, 0.3]
KINDS = (("cat", None), ("svd", None), ("svd", 8), ("linear", None))


def build(tiny: bool, device: str) -> tuple[nn.Module, torch.Tensor, dict]:
    import timm

    torch.manual_seed(0)
    if tiny:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=5)
        x = torch.randn(2, 3, 32, 32)
    else:
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=5)
        x = torch.randn(4, 3, 224, 224)
    configs = {"a": dict(r=4 if tiny else 16, alpha=8 if tiny else 32, targets=["qkv", "fc1"]),
               "b": dict(r=2 if tiny else 8, alpha=2 if tiny else 8, targets=["qkv", "fc2"])}
    return model.to(device).eval(), x.to(device), configs


def pair(base: nn.Module, configs: dict) -> tuple[nn.Module, nn.Module]:
    """The same two adapters, with the same random factors, in peftvision and in peft."""
    import peft

    ours = copy.deepcopy(base)
    theirs = None
    for name, cfg in configs.items():
        pv.apply(ours, "lora", adapter_name=name, train_head=False, **cfg)
        pcfg = peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=cfg["targets"])
        if theirs is None:
            theirs = peft.PeftModel(copy.deepcopy(base), pcfg, adapter_name=name)
        else:
            theirs.add_adapter(name, pcfg)
    mine = {(layer.adapter_name, c): layer for c, layer in _lora_layers(ours)}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in theirs.base_model.model.named_modules():
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict):
                for adapter in m.lora_A:
                    for ours_p, theirs_p in ((mine[(adapter, name)].lora_A, m.lora_A[adapter].weight),
                                             (mine[(adapter, name)].lora_B, m.lora_B[adapter].weight)):
                        value = torch.randn(theirs_p.shape, generator=g) * 0.05
                        theirs_p.copy_(value)
                        ours_p.copy_(value)
    return ours, theirs


def _lora_layers(model: nn.Module):
    """(the user module's name, layer) of every LoRA layer, nested ones (other named adapters on
    the same module wrap one another through `base_layer`) included."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "adapter_name"):
            yield re.sub(r"(\.base_layer)+$", "", name), module


def _timed(fn, *args, **kwargs) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def svd_error(model: nn.Module, rank: int) -> tuple[float, float]:
    """(relative Frobenius error of the mix's ΔW vs Σ wᵢ·ΔWᵢ, the best possible at `rank`),
    the worst over the adapted modules."""
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    for canonical, layer in _lora_layers(model):
        deltas.setdefault(canonical, {})[layer.adapter_name] = layer.delta_weight().detach().float()
    worst = best = 0.0
    for parts in deltas.values():
        exact = sum(w * parts[n] for n, w in zip("ab", WEIGHTS) if n in parts)
        s = torch.linalg.svdvals(exact)
        norm = exact.norm()
        worst = max(worst, float((parts["mix"] - exact).norm() / norm))
        best = max(best, float(s[rank:].square().sum().sqrt() / norm))
    return worst, best


def run(tiny: bool, reps: int, device: str) -> list[dict[str, Any]]:
    base, x, configs = build(tiny, device)
    rows = []
    for kind, rank in KINDS:
        if kind == "linear" and len({c["r"] for c in configs.values()}) > 1:
            configs = {n: {**c, "r": configs["a"]["r"]} for n, c in configs.items()}  # equal ranks
        times: dict[str, list[float]] = {"peftvision": [], "peft": []}
        for _ in range(reps):
            ours, theirs = pair(base, configs)
            times["peftvision"].append(_timed(pv.add_weighted_adapter, ours, ["a", "b"], WEIGHTS,
                                              adapter_name="mix", combination_type=kind, svd_rank=rank))
            times["peft"].append(_timed(theirs.add_weighted_adapter, ["a", "b"], WEIGHTS, "mix",
                                        combination_type=kind, svd_rank=rank))
        pv.set_adapter(ours, "mix")
        theirs.set_adapter("mix")
        with torch.no_grad():
            diff = float((ours(x) - theirs(x)).abs().max())
            scale = float(theirs(x).abs().max())
        row = {"kind": kind, "svd_rank": rank, "ranks": [c["r"] for c in configs.values()],
               "peftvision_s": median(times["peftvision"]), "peft_s": median(times["peft"]),
               "max_abs_diff": diff, "output_max_abs": scale}
        if kind == "svd":
            target = rank or max(c["r"] for c in configs.values())
            row["svd_rel_error"], row["best_rel_error"] = svd_error(ours, target)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-block ViT (smoke test)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="write the rows and the environment as JSON")
    args = parser.parse_args(argv)
    rows = run(args.tiny, args.reps, args.device)
    print(f"{'type':<8} {'rank':>5} {'peftvision s':>13} {'peft s':>9} {'max |Δout|':>11} "
          f"{'svd err':>9} {'best err':>9}")
    for r in rows:
        print(f"{r['kind']:<8} {str(r['svd_rank'] or '-'):>5} {r['peftvision_s']:>13.4f} {r['peft_s']:>9.4f} "
              f"{r['max_abs_diff']:>11.2e} {r.get('svd_rel_error', float('nan')):>9.4f} "
              f"{r.get('best_rel_error', float('nan')):>9.4f}")
    if args.out:
        args.out.write_text(json.dumps({"environment": environment(), "tiny": args.tiny,
                                        "device": args.device, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
