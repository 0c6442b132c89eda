"""python -m benchmarks.datasets NAME DOWNLOAD_DIR --out FILE.csv"""

from __future__ import annotations

import argparse
import sys

from . import ham10000

CONVERTERS = {"ham10000": ham10000.to_csv}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.datasets", description=__doc__)
    p.add_argument("name", choices=list(CONVERTERS))
    p.add_argument("src", help="the download, in its published layout")
    p.add_argument("--out", required=True, help="the CSV to write (path,label; paths relative to it)")
    args = p.parse_args(argv)
    try:
        path = CONVERTERS[args.name](args.src, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: use --dataset {args.name}=csv:{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
