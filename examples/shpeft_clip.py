"""SH-PEFT on a CLIP ViT: data-chosen single weights train; everything else stays bitwise the same.

Real setting (CLIP ViT-B/16 image tower, OpenAI weights from the Hub):

    python examples/shpeft_clip.py --model vit_base_patch16_clip_224.openai --pretrained \\
        --image-size 224 --steps 200 --out runs/shpeft-clip

Tiny setting (the default, offline, seconds on CPU): timm's `vit_base_patch16_clip_224` class and
config -- what makes it CLIP: pre_norm=True (a LayerNorm before the blocks), LayerNorm eps 1e-5,
class token with position embedding on it (no_embed_class=False), token pooling, CLIP mean/std --
shrunk to 2 blocks of width 64 and 8 px patches on 32 px generated images, pretrained=False.

`pv.apply(model, "shpeft", data=batches, fraction=0.01)` scores every weight over the batches and
trains the top 1% as sparse deltas (plus the head). The chosen indices are saved with the adapter,
so it reloads with no data. Exits with status 1 if a check fails.
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

CLASSES, BATCH = 3, 16
FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        FAILED.append(what)


def base_model(args) -> torch.nn.Module:
    torch.manual_seed(0)  # the same seed gives the same base weights every time
    tiny = {} if args.pretrained else dict(embed_dim=64, depth=2, num_heads=4, patch_size=8)
    return timm.create_model(args.model, pretrained=args.pretrained, num_classes=CLASSES,
                             img_size=args.image_size, **tiny)


def make_batch(n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k = a bright k-th colour channel, plus noise. (n, 3, size, size), (n,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, 3, size, size, generator=g)
    return x + F.one_hot(labels, 3).float().view(n, 3, 1, 1), labels


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_clip_224.openai")
    parser.add_argument("--pretrained", action="store_true", help="full-size model, Hub weights")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--fraction", type=float, default=0.01, help="share of weights to train")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", type=Path, help="where to save the adapter (default: a temp dir)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    base = base_model(args)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    loader_batches = [make_batch(BATCH, seed, args.image_size) for seed in range(4)]  # selection data
    model = pv.apply(base, "shpeft", data=loader_batches, fraction=args.fraction)
    print(pv.report(model))
    chosen = {f"{name}.{p}": set(layer.indices(p).tolist()) for name, layer in model.named_modules()
              if hasattr(layer, "indices") and hasattr(layer, "names") for p in layer.names}
    print(f"chosen: {sum(map(len, chosen.values())):,} weights in {len(chosen)} tensors")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    for step in range(args.steps):
        x, y = make_batch(BATCH, 100 + step, args.image_size)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(f"trained {args.steps} steps, last loss {loss.item():.3f}")

    # -- outside the selection nothing moved: merge into a copy and compare with the base -----------
    test_x, _ = make_batch(32, 999, args.image_size)
    expected = outputs(model, test_x)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pv.save_adapter(model, (args.out or Path(tmp)) / "shpeft-clip")
        print("saved " + ", ".join(f"{f.name} ({f.stat().st_size:,} B)" for f in sorted(folder.iterdir())))
        fresh = pv.load_adapter(base_model(args), folder)  # no data: the selection is in the adapter
    diff = (outputs(fresh, test_x) - expected).abs().max().item()
    check(diff <= 1e-6, f"reloaded (without data) == trained outputs (max abs diff {diff:.2e})")

    merged = pv.unload(fresh, merge=True).state_dict()
    outside = moved = 0
    for key, before in original.items():
        if key.startswith("head."):
            continue  # the head trains whole
        changed = set((merged[key] != before).flatten().nonzero().flatten().tolist())
        moved += len(changed)
        outside += len(changed - chosen.get(key, set()))
    check(moved > 0, f"training changed {moved:,} chosen weights")
    check(outside == 0, f"weights outside the selection unchanged ({outside} moved)")
    print(f"\n{'FAILED: ' + '; '.join(FAILED) if FAILED else 'all checks passed'} "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
