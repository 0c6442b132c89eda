"""The text-to-image runs of a grid (Dutt et al. Table 4 / Figure 2) through `generate`: one
`benchmarks.generation.run.run` per Run, skipped under --resume when its result exists."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .grid import Run


def generate_args(r: Run, spec: str, args) -> argparse.Namespace:
    """The `generate` arguments of one Run: the generation CLI's defaults, then the grid's settings,
    then the command line's text-to-image overrides."""
    from ..generation.run import add_arguments

    g = add_arguments(argparse.ArgumentParser()).parse_args([])
    if len(r.method) > 1:  # a combination: METHOD.KEY=VALUE, as `generate --option` takes them
        options = [f"{m}.{k}={json.dumps(v)}" for m, o in r.options.items() for k, v in o.items()]
    else:
        options = [f"{k}={json.dumps(v)}" for k, v in r.options.items()]
    fid_images = args.fid_images or r.extra.get("fid_images")
    g.__dict__.update(
        model=r.model, data=spec, method="+".join(r.method), option=options, steps=r.steps,
        image_size=r.image_size, batch_size=r.batch_size, lr=r.lr, seed=r.seed, seeds=None,
        fraction=r.fraction, train_images=r.extra.get("train_pool"), test_images=fid_images,
        num_samples=fid_images, out=args.out, device=None if args.device == "auto" else args.device,
        fid_features=args.fid_features, inference_steps=args.inference_steps or g.inference_steps)
    return g


def execute_generation(runs: list[Run], specs: dict, args) -> None:
    from ..generation.run import parse_method, run, run_dir_name
    from ..results import RESULT_NAME

    for i, r in enumerate(runs, 1):
        g = generate_args(r, specs[r.dataset], args)
        done = Path(args.out) / run_dir_name(g, parse_method(g.method, g.option)[0]) / RESULT_NAME
        if args.resume and done.is_file():
            print(f"[{i}/{len(runs)}] exists, skipped: {done.parent}")
            continue
        print(f"[{i}/{len(runs)}] {r.label} · {r.fraction:.0%} · seed {r.seed}", flush=True)
        run(g)
