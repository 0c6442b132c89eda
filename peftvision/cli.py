"""The `peftvision` command line: methods, report, merge, push.

The benchmarks are not part of the installed package: run them from a source checkout with
`python -m benchmarks` (`peftvision bench` only says so).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from pathlib import Path

# targets=qkv or targets=qkv,proj: module names, matched by suffix like targets=["qkv"] in Python.
# Anything else (targets=".*attn.*", a named set such as all-linear) stays a string (a regex).
_NAMES = re.compile(r"[A-Za-z_][\w.]*(,[A-Za-z_][\w.]*)*")

OPTIONS_HELP = ("method options as key=value, e.g. r=16 qkv_parts=qv; values are JSON where they parse. "
                "targets=qkv,proj lists module names (matched by suffix, as targets=['qkv','proj'] in "
                "Python); any other string is a regex matched against full module names")


def _parse_options(pairs: list[str]) -> dict:
    """key=value pairs; values are JSON where they parse (16, 0.1, true, ["qkv"]), else strings;
    targets=NAME[,NAME...] becomes a list of module names."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"option {pair!r} is not key=value (e.g. r=16)")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value.split(",") if key == "targets" and _NAMES.fullmatch(value) else value
    return options


def _hub_hint(exc: BaseException, what: str) -> SystemExit:
    """One line instead of a traceback when weights cannot be fetched (offline, no cache)."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return SystemExit(f"peftvision: could not get {what} ({type(exc).__name__}: {detail}). Offline? "
                      "Pass --weights FILE (a local .safetensors/.pth state dict) or --no-pretrained "
                      "(random weights, for testing)")


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
    # (num_classes=None keeps the model's own head, e.g. timm's 1000 ImageNet classes)
    pv.apply(model, args.method, **_parse_options(args.options))
    report = pv.report(model)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)


def _adapter_folder(source: str) -> Path:
    """A local adapter folder, or the Hub repo's files in the local cache (downloaded once)."""
    if Path(source).is_dir():
        return Path(source)
    from peftvision.hub import download_adapter

    return download_adapter(source)


def recorded_num_classes(folder: Path, base: str) -> int | None:
    """The class count the adapter's saved head has (None: no head saved, or not a classifier):
    read from the tensor shapes in the safetensors header, nothing loaded."""
    if base == "sd15-unet" or base.startswith("diffusers:"):
        return None
    from safetensors import safe_open

    from peftvision.checkpoint import WEIGHTS_NAME
    from peftvision.targets import head_modules
    from peftvision.zoo import create_model

    heads = {f"{name}.weight" for name, _ in head_modules(create_model(base, meta=True))}
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys() if k in heads]
    return int(shapes[0][0]) if shapes else None


def _base_model(args, num_classes: int | None):
    from peftvision.hub import offline_if_unreachable
    from peftvision.zoo import create_model

    pretrained = not args.no_pretrained and not args.weights
    try:
        # unreachable Hub: huggingface_hub reads its cache at once instead of retrying for a minute
        with offline_if_unreachable() if pretrained else contextlib.nullcontext():
            return create_model(args.base, pretrained=pretrained, weights=args.weights,
                                num_classes=num_classes)
    except OSError as exc:  # huggingface_hub's errors: offline and not cached, no such repo
        if pretrained:
            raise _hub_hint(exc, f"pretrained weights for {args.base!r}") from exc
        raise SystemExit(f"peftvision: {exc}") from exc  # --weights FILE not found
    except ValueError as exc:  # a weights file for another model, unreadable file
        raise SystemExit(f"peftvision: {exc}") from exc


def cmd_merge(args) -> None:
    import torch
    from safetensors.torch import save_file

    import peftvision as pv

    folder = _adapter_folder(args.adapter)
    num_classes = args.num_classes
    if num_classes is None:
        try:
            num_classes = recorded_num_classes(folder, args.base)
        except RuntimeError as exc:  # timm: Unknown model (NAME)
            raise SystemExit(f"peftvision: --base {args.base!r}: {exc}") from exc
    base = _base_model(args, num_classes)
    pv.load_adapter(base, folder)
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


BENCH_MOVED = ("the benchmarks are not part of the installed package: in a source checkout "
               "(git clone, pip install -e \".[all]\") run `python -m benchmarks --help`, "
               "e.g. `python -m benchmarks demo`")


def cmd_bench(args) -> None:
    raise SystemExit(f"peftvision: {BENCH_MOVED}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftvision", description="Parameter-efficient "
                                     "fine-tuning for timm and diffusers vision models.")
    from peftvision import __version__

    parser.add_argument("--version", action="version", version=f"peftvision {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what apply does (-v: per method, -vv: every module)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the methods and what each supports")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("report", help="trainable parameters of METHOD on MODEL (no download)",
                       description="Builds MODEL without weights (meta device) and applies METHOD. "
                       "MODEL: a timm name, 'sd15-unet', or 'diffusers:CONFIG.json'.")
    p.add_argument("model")
    p.add_argument("method")
    p.add_argument("options", nargs="*", help=OPTIONS_HELP)
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the head (default: the model's own head)")
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
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the head (default: the class count of the adapter's saved head)")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("push", help="upload a saved adapter folder to the Hugging Face Hub")
    p.add_argument("directory", type=Path)
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision")
    p.add_argument("--message", default="Upload peftvision adapter")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("bench", help="moved: `python -m benchmarks` in a source checkout",
                       description=BENCH_MOVED)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from peftvision.errors import PeftVisionError

    if args.verbose:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        logging.getLogger("peftvision").setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO)
    try:
        args.func(args)
        sys.stdout.flush()
    except PeftVisionError as exc:
        raise SystemExit(f"peftvision: {exc}") from exc
    except BrokenPipeError:  # `peftvision methods | head` closed the pipe: not an error
        # Python would report the failed flush of stdout at exit; point it at /dev/null instead
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None


if __name__ == "__main__":
    main()
