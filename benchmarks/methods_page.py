"""Moved to tools/methods_page.py (docs generation is not a benchmark); this name keeps
`python -m benchmarks.methods_page` working for branches that still call it."""

from tools.methods_page import main, page  # noqa: F401

if __name__ == "__main__":
    main()
