"""python -m benchmarks.datasets NAME DOWNLOAD_DIR --out FILE.csv"""

from __future__ import annotations

import argparse
import sys

from . import fitzpatrick17k, ham10000, rsna_pneumonia, smdg

CONVERTERS = {"ham10000": ham10000.to_csv, "rsna-pneumonia": rsna_pneumonia.to_csv,
              "fitzpatrick17k": fitzpatrick17k.to_csv, "smdg": smdg.to_csv}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.datasets", description=__doc__)
    p.add_argument("name", choices=list(CONVERTERS))
    p.add_argument("src", help="the download, in its published layout")
    p.add_argument("--out", required=True, help="the CSV to write (path,label; paths relative to it)")
    p.add_argument("--label-column", choices=fitzpatrick17k.LABEL_COLUMNS,
                   help="fitzpatrick17k: the label (default three_partition_label)")
    p.add_argument("--no-suspects", action="store_true",
                   help="smdg: leave out the glaucoma suspects (types -1), a binary task")
    args = p.parse_args(argv)
    kwargs = {}
    if args.label_column:
        if args.name != "fitzpatrick17k":
            p.error("--label-column is for fitzpatrick17k")
        kwargs["label_column"] = args.label_column
    if args.no_suspects:
        if args.name != "smdg":
            p.error("--no-suspects is for smdg")
        kwargs["suspects"] = False
    try:
        path = CONVERTERS[args.name](args.src, args.out, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: use --dataset {args.name}=csv:{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
