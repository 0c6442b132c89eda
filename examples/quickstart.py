"""peftvision quickstart: LoRA on a ViT and SSF on a ResNet, end to end, offline, on CPU.

    python examples/quickstart.py [--epochs 5] [--steps 8] [--out DIR]

For each model: apply a method, print the parameter report, train the adapter (and the new
classifier head) on a small generated dataset, save the adapter, load it onto a fresh base model,
then merge it and unload it, checking at every stage that the outputs stay the same.
Randomly initialised weights (same seed = same "pretrained" base) stand in for downloaded ones.
Exits with status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import peftvision as pv

SEED = 0
CLASSES = 3
SIZE = 64  # images are (3, 64, 64)
BATCH = 32


def make_dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy, coloured stripes; the class sets their angle (0, 60, 120 degrees) and tints them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)  # (n,)
    yy, xx = torch.meshgrid(torch.arange(SIZE * 1.0), torch.arange(SIZE * 1.0), indexing="ij")
    angle = (labels * math.pi / CLASSES).view(n, 1, 1)
    freq = 0.3 + 0.4 * torch.rand(n, 1, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    stripes = torch.sin((xx * angle.cos() + yy * angle.sin()) * freq + phase)  # (n, H, W)
    colour = F.one_hot(labels, CLASSES) + torch.rand(n, 3, generator=g)  # (n, 3)
    noise = 0.5 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    return colour.view(n, 3, 1, 1) * stripes.unsqueeze(1) + noise, labels  # (n, 3, H, W), (n,)


def vit() -> torch.nn.Module:  # ViT-Tiny (5.5M parameters) on 64x64 images: 16 patches + CLS
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=CLASSES,
                             img_size=SIZE)


def resnet() -> torch.nn.Module:  # ResNet-18 layout at 1/4 width (0.7M parameters)
    return timm.create_model("resnet18", pretrained=False, num_classes=CLASSES,
                             stem_width=16, channels=(16, 32, 64, 128))


def base_model(build) -> torch.nn.Module:
    torch.manual_seed(SEED)  # the same seed gives the same base weights every time
    return build()


def outputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(images)  # (B, CLASSES)


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (outputs(model, images).argmax(-1) == labels).float().mean().item()


FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        FAILED.append(what)


def run(title: str, build, method: str, options: dict, lr: float, args, data, out: Path) -> None:
    (train_x, train_y), (test_x, test_y) = data
    call = ", ".join(["model", repr(method), *(f"{k}={v}" for k, v in options.items())])
    print(f"\n=== {title}: pv.apply({call})")
    model = pv.apply(base_model(build), method, **options)  # in place: base frozen, head trains
    print(pv.report(model))

    # -- train: nothing peftvision-specific, just optimise what requires grad -------------------
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    print(f"\nbefore training: held-out accuracy {accuracy(model, test_x, test_y):.1%}")
    losses = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(epoch))
        total = 0.0
        for step in range(args.steps):
            batch = order[step * BATCH:(step + 1) * BATCH]
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total / args.steps)
        # (ResNet: held-out accuracy lags at first, until BatchNorm's running statistics catch up)
        print(f"epoch {epoch}: train loss {losses[-1]:.3f}   "
              f"held-out accuracy {accuracy(model, test_x, test_y):.1%}")
    if len(losses) > 1:
        check(losses[-1] < losses[0], f"train loss went down ({losses[0]:.3f} -> {losses[-1]:.3f})")

    # -- save the adapter, load it onto a fresh base model --------------------------------------
    folder = pv.save_adapter(model, out / title)
    print("\nsaved " + ", ".join(f"{f.name} ({f.stat().st_size:,} B)" for f in sorted(folder.iterdir())))
    expected = outputs(model, test_x)
    fresh = pv.load_adapter(base_model(build), folder)
    diff = (outputs(fresh, test_x) - expected).abs().max().item()
    check(diff <= 1e-6, f"loaded == trained outputs (max abs diff {diff:.2e})")

    # -- merge: fold the adapter into the base weights (no extra cost at inference) -------------
    unmerged = outputs(fresh, test_x)
    pv.merge(fresh)
    merged = outputs(fresh, test_x)
    diff = (merged - unmerged).abs().max().item()
    check(torch.allclose(merged, unmerged, rtol=1e-5, atol=1e-5),
          f"merged == unmerged outputs (max abs diff {diff:.2e})")

    # -- unload: a plain timm model again, with what was learned folded into its weights --------
    plain = pv.unload(fresh, merge=True)
    diff = (outputs(plain, test_x) - merged).abs().max().item()
    check(diff <= 1e-6, f"plain model == merged outputs (max abs diff {diff:.2e})")
    leftovers = sorted({type(m).__name__ for m in plain.modules()
                        if type(m).__module__.startswith("peftvision")})
    check(not leftovers, "no peftvision modules left" + (f": found {leftovers}" if leftovers else ""))
    same_keys = list(plain.state_dict()) == list(base_model(build).state_dict())
    check(same_keys, "state_dict keys equal the base model's")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help=f"steps per epoch (batch {BATCH})")
    parser.add_argument("--out", type=Path, help="where to save the adapters (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.steps < 1:
        parser.error("--epochs and --steps must be at least 1")

    start = time.perf_counter()
    data = make_dataset(args.steps * BATCH, seed=1), make_dataset(240, seed=2)  # train, held out
    print(f"data: {len(data[0][1])} training and {len(data[1][1])} held-out images, "
          f"{CLASSES} classes, {SIZE}x{SIZE}")
    print("methods:", ", ".join(pv.methods()))
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        run("vit-lora", vit, "lora", {"r": 8}, 3e-3, args, data, out)
        run("resnet-ssf", resnet, "ssf", {}, 1e-2, args, data, out)
    print(f"\n{'FAILED: ' + '; '.join(FAILED) if FAILED else 'all checks passed'} "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
