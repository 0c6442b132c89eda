"""LoRA on a timm ViT for dermatology (HAM10000-style, 7 classes), through the benchmarks' runner.

Real setting (pretrained ViT-B/16 from the Hub, or a local weights file with --weights):

    python examples/vit_lora_dermatology.py --model vit_base_patch16_224 \\
        --data imagefolder:/path/HAM10000 --epochs 20 --out runs/ham10000

--data takes the runner's dataset specs: `imagefolder:DIR` (DIR/<class>/<images>, e.g. HAM10000
sorted by `dx`) or `csv:FILE` (`image,dx` rows; an optional `split` column). Tiny setting, offline,
seconds on CPU: `--tiny` = the runner's generated `demo` textures, its `tiny-vit` model
(pretrained=False), 32 px, 1 epoch. Prints the test macro-F1, per-class F1 and the parameter report,
then reloads the saved adapter onto a fresh base model. Run from the repository root (it imports
`benchmarks`, which is not in the wheel). Exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives in the checkout

import peftvision as pv  # noqa: E402
from benchmarks.models import build_model  # noqa: E402
from benchmarks.train import RunConfig, run_experiment  # noqa: E402

FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        FAILED.append(what)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224", help="a timm ViT name")
    parser.add_argument("--data", help="imagefolder:DIR | csv:FILE (HAM10000-style)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weights", help="local pretrained weights file instead of the Hub")
    parser.add_argument("--tiny", action="store_true",
                        help="offline smoke run: demo data, tiny-vit, 32 px, 1 epoch")
    parser.add_argument("--out", type=Path, help="result JSON + adapter (default: a temp dir)")
    args = parser.parse_args(argv)
    if not args.tiny and not args.data:
        parser.error("--data is required (or --tiny for the offline smoke run)")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        cfg = RunConfig(dataset="demo" if args.tiny else args.data,
                        model="tiny-vit" if args.tiny else args.model, method="lora",
                        method_options={"r": 4 if args.tiny else args.r},
                        epochs=1 if args.tiny else args.epochs,
                        image_size=32 if args.tiny else args.image_size, lr=args.lr,
                        pretrained=not args.tiny and not args.weights, weights=args.weights,
                        out=str(out), name="vit-lora-dermatology")
        print(f"LoRA (r={cfg.method_options['r']}) on {cfg.model}, data {cfg.dataset}, "
              f"{cfg.epochs} epoch(s), {cfg.image_size} px")
        result = run_experiment(cfg)

        test, classes = result["metrics"]["test"], result["dataset"]["classes"]
        auroc = "n/a" if test["auroc"] is None else f"{test['auroc']:.4f}"
        print(f"\ntest macro-F1 {test['macro_f1']:.4f}   accuracy {test['accuracy']:.4f}   "
              f"AUROC {auroc}   ({test['n']} images)")
        for name, f1 in zip(classes, test["per_class_f1"]):
            print(f"  {name:>20}: F1 {'n/a' if f1 is None else f'{f1:.3f}'}")
        check(0.0 <= test["macro_f1"] <= 1.0 and not math.isnan(test["macro_f1"]),
              "macro-F1 is a number in [0, 1]")

        # -- the adapter the runner saved loads onto a fresh base model ---------------------------
        folder = Path(result["adapter"]["path"])
        base = build_model(cfg.model, len(classes), cfg.image_size, pretrained=cfg.pretrained)
        pv.load_adapter(base, folder)
        rep = pv.report(base)
        print(f"\nadapter {folder} ({result['adapter']['bytes']:,} B) loaded onto a fresh model:")
        print(rep)
        check(rep.trainable == result["parameters"]["trainable"],
              f"reloaded trainable count equals the run's ({rep.trainable:,})")
        check(0 < rep.trainable < rep.total, "only part of the model trains")
    print(f"\n{'FAILED: ' + '; '.join(FAILED) if FAILED else 'all checks passed'} "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
