"""The `peftvision` command line: methods, report, merge, push, bench."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _parse_options(pairs: list[str]) -> dict:
    """key=value pairs; values are JSON where they parse (16, 0.1, true, ["qkv"]), else strings."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"option {pair!r} is not key=value (e.g. r=16)")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def cmd_methods(args) -> None:
    import peftvision as pv

    print(f"{'method':<12} {'kind':<10} {'merges':<7} {'architectures':<28} summary")
    for info in pv.methods().values():
        archs = ",".join(info.architectures)
        aliases = f" (alias: {', '.join(info.aliases)})" if info.aliases else ""
        print(f"{info.name:<12} {info.kind:<10} {'yes' if info.mergeable else 'no':<7} {archs:<28} "
              f"{info.summary}{aliases}")


def cmd_report(args) -> None:
    import peftvision as pv
    from peftvision.zoo import create_model

    model = create_model(args.model, num_classes=args.num_classes, meta=not args.materialize)
    pv.apply(model, args.method, **_parse_options(args.options))
    report = pv.report(model)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)


def cmd_merge(args) -> None:
    import torch
    from safetensors.torch import save_file

    import peftvision as pv
    from peftvision.zoo import create_model

    base = create_model(args.base, pretrained=not args.no_pretrained, weights=args.weights,
                        num_classes=args.num_classes)
    pv.load_adapter(base, args.adapter)
    merged = pv.unload(base, merge=True)
    state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    with torch.no_grad():
        save_file(state, str(args.out), metadata={"format": "pt", "merged_by": "peftvision"})
    print(f"wrote {len(state)} tensors to {args.out}")


def cmd_push(args) -> None:
    from peftvision.checkpoint import read_adapter
    from peftvision.hub import push_folder

    read_adapter(args.directory)  # refuse to upload something that would not load
    print(push_folder(args.directory, args.repo_id, private=args.private or None,
                      revision=args.revision, commit_message=args.message))


def cmd_bench(args) -> None:
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "benchmarks" / "__init__.py").is_file():
        raise SystemExit("the benchmarks live in the peftvision source repository "
                         "(benchmarks/ is not installed); run this from a checkout")
    sys.exit(subprocess.call([sys.executable, "-m", "benchmarks", *args.bench_args], cwd=repo))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftvision", description="Parameter-efficient "
                                     "fine-tuning for timm and diffusers vision models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the methods and what each supports")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("report", help="trainable parameters of METHOD on MODEL (no download)",
                       description="Builds MODEL without weights (meta device) and applies METHOD. "
                       "MODEL: a timm name, 'sd15-unet', or 'diffusers:CONFIG.json'.")
    p.add_argument("model")
    p.add_argument("method")
    p.add_argument("options", nargs="*", help="method options as key=value, e.g. r=16 qkv_parts=qv")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--materialize", action="store_true",
                   help="build real (random) weights instead of meta tensors (needed by svdiff)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("merge", help="fold an adapter into its base and write full weights",
                       description="Loads ADAPTER onto the base model, merges, and writes the plain "
                       "model's state dict as safetensors.")
    p.add_argument("adapter", help="adapter folder or Hub repo id")
    p.add_argument("--base", required=True, help="timm name, 'sd15-unet' or 'diffusers:ID_OR_DIR'")
    p.add_argument("--weights", help="local base weights file (timm) instead of the Hub")
    p.add_argument("--no-pretrained", action="store_true", help="random base weights (testing)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("push", help="upload a saved adapter folder to the Hugging Face Hub")
    p.add_argument("directory", type=Path)
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision")
    p.add_argument("--message", default="Upload peftvision adapter")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("bench", help="run the benchmark suite (python -m benchmarks ...)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from peftvision.errors import PeftVisionError

    try:
        args.func(args)
    except PeftVisionError as exc:
        raise SystemExit(f"peftvision: {exc}") from exc


if __name__ == "__main__":
    main()
