"""Generated documentation stays in step with the code."""

from pathlib import Path

from tools import methods_page

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_methods_page_is_current():
    assert (DOCS / "methods.md").read_text() == methods_page.page(), \
        "docs/methods.md is stale: run `python -m tools.methods_page`"
