"""Published dataset layouts -> the benchmark's `csv:` format (path,label rows), written beside
nothing of the user's: the CSV goes where `--out` says, with paths relative to it.

    python -m benchmarks.datasets ham10000 DOWNLOAD_DIR --out DATA/ham10000/labels.csv
"""
