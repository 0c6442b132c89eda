"""Share an adapter on the Hugging Face Hub and load it back onto a fresh base model.

Real setting (needs the network and a write token: `hf auth login` or HF_TOKEN):

    python examples/hub_push_and_load.py --repo user/vit-lora-demo --model vit_base_patch16_224 \\
        --pretrained

calls pv.push_to_hub(model, "user/vit-lora-demo", tags=["medical-imaging"], metrics=...), then
pv.load_adapter(fresh, "user/vit-lora-demo"), which downloads it (Hub cache respected).

Dry run (`--dry-run`; the default when HF_HUB_OFFLINE=1 or no token is found; offline, seconds):
a ViT-Tiny built for 32 px, pretrained=False, gets LoRA and a few training steps, then exactly
what would be uploaded (pv.save_adapter with the same tags and metrics) goes to --out and loads
back from that folder. Both print the model card. Exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import peftvision as pv

CLASSES, BATCH, TAGS = 3, 16, ["medical-imaging"]
FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        FAILED.append(what)


def base_model(args) -> torch.nn.Module:
    torch.manual_seed(0)  # the same seed gives the same base weights every time
    size = {} if args.pretrained else {"img_size": 32}
    return timm.create_model(args.model, pretrained=args.pretrained, num_classes=CLASSES, **size)


def hub_unavailable() -> bool:
    from huggingface_hub import get_token

    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or not get_token()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", help="Hub repo id user/name to push to")
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="a timm model name")
    parser.add_argument("--pretrained", action="store_true", help="Hub weights, native image size")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="save to --out instead of pushing")
    parser.add_argument("--out", type=Path, help="dry run: where the upload goes (default: temp dir)")
    args = parser.parse_args(argv)
    dry = args.dry_run or not args.repo or hub_unavailable()
    if not dry and "/" not in args.repo:
        parser.error("--repo must be user/name")

    start = time.perf_counter()
    model = pv.apply(base_model(args), "lora", r=4)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1] if args.pretrained else 32
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(args.steps):
        x, y = torch.randn(BATCH, 3, size, size, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)
        loss = F.cross_entropy(model(x + F.one_hot(y, 3).float().view(-1, 3, 1, 1)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    metrics = {"train_loss": round(loss.item(), 4)}
    test_x = torch.randn(8, 3, size, size, generator=g)
    model.eval()
    with torch.no_grad():
        expected = model(test_x)

    with tempfile.TemporaryDirectory() as tmp:
        fresh = base_model(args)
        if dry:
            print(f"dry run ({'--dry-run' if args.dry_run else 'offline or no token'}): "
                  f"saving what would be uploaded{' to ' + args.repo if args.repo else ''}")
            source = pv.save_adapter(model, (args.out or Path(tmp)) / "hub-upload", tags=TAGS,
                                     metrics=metrics)
            card = (source / "README.md").read_text()
        else:
            print("pushed:", pv.push_to_hub(model, args.repo, private=args.private or None,
                                            tags=TAGS, metrics=metrics))
            source = args.repo
        pv.load_adapter(fresh, source)  # a folder, or a repo id downloaded from the Hub
        if not dry:
            from huggingface_hub import hf_hub_download

            card = Path(hf_hub_download(args.repo, "README.md")).read_text()
    print(f"\n--- model card ({source}) ---\n{card.strip()}\n---")
    fresh.eval()
    with torch.no_grad():
        diff = (fresh(test_x) - expected).abs().max().item()
    check(diff <= 1e-6, f"loaded == trained outputs (max abs diff {diff:.2e})")
    check(all(t in card for t in TAGS), f"card has the tags {TAGS}")
    check("train_loss" in card, "card lists the metrics")
    print(f"\n{'FAILED: ' + '; '.join(FAILED) if FAILED else 'all checks passed'} "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
