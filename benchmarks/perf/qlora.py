"""QLoRA next to LoRA: base-weight memory, output drift and training-step time of one model with
float32, bitsandbytes int8 (Linear8bitLt) and NF4 (Linear4bit) block Linears, LoRA on each.

    python -m benchmarks.perf.qlora                        # ViT-B/16 (pretrained=False), CPU
    python -m benchmarks.perf.qlora --model vit_large_patch16_224 --steps 5 --device cuda
    python -m benchmarks.perf.qlora --tiny --steps 2       # smoke test, seconds

Per variant, measured in one process on copies of one seeded model (needs bitsandbytes):
  weight MB   bytes of the model's state_dict (weights, biases, quantization statistics)
  drift       max |logits - float logits| / max |float logits| on one batch, LoRA at init
  step ms     median of --steps training steps (zero_grad, forward, cross-entropy, backward,
              AdamW on LoRA + head), timed in rotating order after one warm-up step each
The model is randomly initialised: drift measures the quantization, not a pretrained model's
accuracy.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import peftvision as pv
from peftvision import quant


def build(name: str, tiny: bool) -> nn.Module:
    import timm

    torch.manual_seed(0)
    if tiny:  # width 64: bitsandbytes' CPU 4-bit needs in_features divisible by 64 (quant.py)
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                 num_classes=10)
    return timm.create_model(name, pretrained=False, num_classes=10)


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t))


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--tiny", action="store_true", help="a 2-block ViT of width 64 (smoke test)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    base = build(args.model, args.tiny).to(args.device)
    size = (3, 32, 32) if args.tiny else base.pretrained_cfg.get("input_size", (3, 224, 224))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, *size, generator=g).to(args.device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(args.device)
    variants = {"float32": copy.deepcopy(base),
                "int8": quant.quantize(copy.deepcopy(base), 8),
                "nf4": quant.quantize(copy.deepcopy(base), 4)}
    rows, opts = {}, {}
    for label, model in variants.items():
        weight_mb = state_bytes(model) / 2**20
        pv.apply(model, "lora", r=args.r)
        model.train()  # no dropout in these models; bitsandbytes' float-activation path
        with torch.no_grad():
            logits = model(x)
        rows[label] = {"weight MB": weight_mb, "logits": logits,
                       "trainable": pv.report(model).trainable}
        opts[label] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step(model, opts[label], x, y)  # warm-up
    times: dict[str, list[float]] = {label: [] for label in variants}
    order = list(variants)
    for i in range(args.steps):  # rotate so drift and other load hit every variant alike
        for label in order[i % len(order):] + order[: i % len(order)]:
            times[label].append(step(variants[label], opts[label], x, y))

    reference = rows["float32"]["logits"]
    print(f"{args.model if not args.tiny else 'tiny ViT'}, LoRA r={args.r}, batch {args.batch}, "
          f"{args.device}, median of {args.steps} steps")
    print(f"{'variant':<8} {'weight MB':>10} {'vs float':>9} {'drift':>9} {'trainable':>11} {'step ms':>9}")
    for label, row in rows.items():
        drift = float((row["logits"] - reference).abs().max() / reference.abs().max())
        ratio = row["weight MB"] / rows["float32"]["weight MB"]
        print(f"{label:<8} {row['weight MB']:>10.1f} {ratio:>9.3f} {drift:>9.2e} "
              f"{row['trainable']:>11,} {1e3 * statistics.median(times[label]):>9.1f}")


if __name__ == "__main__":
    main()
