"""Benchmarks for peftvision (not packaged; run from a checkout with `python -m benchmarks...`)."""
