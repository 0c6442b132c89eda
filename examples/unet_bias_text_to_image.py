"""Bias tuning (BitFit) of a Stable Diffusion UNet for text-to-image, with FID, via the benchmarks.

Real setting (SD-1.5 from the Hub or a local folder; a GPU; BUSI-style images with captions.csv):

    python examples/unet_bias_text_to_image.py --model runwayml/stable-diffusion-v1-5 \\
        --data imagefolder-with-captions:/path/busi --steps 1000 --inference-steps 50 \\
        --fid-features inception --out runs/unet-bias

Tiny setting (`--tiny`, offline, seconds on CPU): the generation benchmark's `tiny` components (the
real diffusers/transformers classes, tiny configs, random weights), its generated `demo` caption
set, a few steps, 2 sampling steps and FID on the offline random-conv features (a smoke number,
comparable only to other offline-feature runs). Prints the trainable count and FID, then reloads
the adapter onto a fresh UNet. Run from the repository root (it imports `benchmarks`, not in the
wheel). Exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives in the checkout

import torch  # noqa: E402

import peftvision as pv  # noqa: E402
from benchmarks.generation.components import load_components  # noqa: E402
from benchmarks.generation.run import add_arguments, run  # noqa: E402

FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        FAILED.append(what)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runwayml/stable-diffusion-v1-5", help="Hub id or DIR")
    parser.add_argument("--data", help="imagefolder-with-captions:PATH (PATH/captions.csv)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--fid-features", choices=("auto", "inception", "offline"), default="auto")
    parser.add_argument("--tiny", action="store_true",
                        help="offline smoke run: tiny SD components, demo captions, 4 steps")
    parser.add_argument("--out", type=Path, help="result JSON, adapter, samples (default: temp dir)")
    args = parser.parse_args(argv)
    if not args.tiny and not args.data:
        parser.error("--data is required (or --tiny for the offline smoke run)")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        real = ["--model", args.model, "--data", args.data or "", "--steps", str(args.steps),
                "--inference-steps", str(args.inference_steps), "--fid-features", args.fid_features]
        tiny = ["--model", "tiny", "--data", "demo", "--steps", "4", "--inference-steps", "2",
                "--num-samples", "8", "--fid-features", "offline"]
        gargs = add_arguments(argparse.ArgumentParser()).parse_args(
            [*(tiny if args.tiny else real), "--method", "bias", "--lr", str(args.lr * (100 if args.tiny else 1)),
             "--out", str(out)])
        result = run(gargs)  # apply bias -> train -> sample -> FID -> save adapter + result.json

        fid_name = next(k for k in result["metrics"] if k.startswith("fid_"))
        fid, params = result["metrics"][fid_name], result["parameters"]
        print(f"\n{fid_name} = {fid:.4f}   trainable {params['trainable']:,} of {params['total']:,} "
              f"({100 * params['trainable'] / params['total']:.3f}%)   "
              f"final loss {result['metrics']['final_loss']:.4f}")
        check(math.isfinite(fid) and fid >= 0, "FID is a finite, non-negative number")

        # -- only the UNet's biases train: count them on a fresh UNet -------------------------------
        fresh = load_components(gargs.model, gargs.image_size or 32).unet
        biases = sum(p.numel() for n, p in fresh.named_parameters() if n.endswith(".bias"))
        check(params["trainable"] == biases, f"trainable == the UNet's bias count ({biases:,})")

        # -- the adapter loads onto a fresh UNet, which then differs only in its biases -------------
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        pv.load_adapter(fresh, result["adapter"]["path"])
        after = pv.unload(fresh, merge=True).state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        check(bool(changed) and all(k.endswith(".bias") for k in changed),
              f"reloaded adapter changes only biases ({len(changed)} tensors)")
    print(f"\n{'FAILED: ' + '; '.join(FAILED) if FAILED else 'all checks passed'} "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
