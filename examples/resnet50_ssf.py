"""SSF on a ResNet-50: train, save the adapter, reload it, merge and unload, outputs agree.

Real setting (ImageNet ResNet-50 from the Hub; a few hundred steps on your own batches):

    python examples/resnet50_ssf.py --full --pretrained --steps 200 --out runs/resnet50-ssf

Tiny setting (the default, offline, seconds on CPU): timm's `resnet50` class (Bottleneck blocks)
with one block per stage, 1/4 width and pretrained=False, on generated 64 px images (2 classes:
horizontal vs vertical stripes). A fixed seed gives the same random "pretrained" base every time,
so a fresh model is the same base the adapter was trained on. Exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import peftvision as pv

CLASSES, SIZE, BATCH = 2, 64, 16
FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        FAILED.append(what)


def make_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy stripes: class 0 horizontal, class 1 vertical. (n, 3, SIZE, SIZE), (n,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    wave = torch.sin(torch.arange(SIZE) * 0.5).view(1, SIZE)  # (1, SIZE)
    stripes = torch.where(labels.view(n, 1, 1) == 0, wave.T.expand(SIZE, SIZE), wave.expand(SIZE, SIZE))
    return stripes.unsqueeze(1).expand(n, 3, SIZE, SIZE) + 0.5 * torch.randn(n, 3, SIZE, SIZE, generator=g), labels


def base_model(args) -> torch.nn.Module:
    torch.manual_seed(0)  # the same seed gives the same base weights every time
    if args.full:
        return timm.create_model("resnet50", pretrained=args.pretrained, num_classes=CLASSES)
    return timm.create_model("resnet50", pretrained=False, num_classes=CLASSES, layers=(1, 1, 1, 1),
                             channels=(16, 32, 64, 128), stem_width=16, zero_init_last=False)


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)  # (B, CLASSES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help=f"training steps (batch {BATCH})")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--full", action="store_true", help="full-size ResNet-50 (25.6M parameters)")
    parser.add_argument("--pretrained", action="store_true", help="with --full: Hub weights")
    parser.add_argument("--out", type=Path, help="where to save the adapter (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    start = time.perf_counter()
    model = pv.apply(base_model(args), "ssf")  # in place: base frozen, SSF + head train
    print(pv.report(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(args.steps):
        x, y = make_batch(BATCH, seed=step)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"\ntrained {args.steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    test_x, _ = make_batch(32, seed=10_000)
    expected = outputs(model, test_x)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pv.save_adapter(model, (args.out or Path(tmp)) / "resnet50-ssf")
        print("saved " + ", ".join(f"{f.name} ({f.stat().st_size:,} B)" for f in sorted(folder.iterdir())))
        fresh = pv.load_adapter(base_model(args), folder)
    diff = (outputs(fresh, test_x) - expected).abs().max().item()
    check(diff <= 1e-6, f"loaded == trained outputs (max abs diff {diff:.2e})")

    pv.merge(fresh)  # fold γ, β into the conv/BN weights
    merged = outputs(fresh, test_x)
    diff = (merged - expected).abs().max().item()
    check(torch.allclose(merged, expected, rtol=1e-4, atol=1e-4), f"merged == trained outputs ({diff:.2e})")
    plain = pv.unload(fresh, merge=True)  # a plain timm ResNet again
    diff = (outputs(plain, test_x) - merged).abs().max().item()
    check(diff <= 1e-6, f"unloaded == merged outputs ({diff:.2e})")
    left = {type(m).__name__ for m in plain.modules() if type(m).__module__.startswith("peftvision")}
    check(not left, "no peftvision modules left" + (f": {sorted(left)}" if left else ""))
    check(list(plain.state_dict()) == list(base_model(args).state_dict()),
          "state_dict keys equal the base model's")
    print(f"\n{'FAILED: ' + '; '.join(FAILED) if FAILED else 'all checks passed'} "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
