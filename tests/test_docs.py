"""Generated documentation stays in step with the code."""

from pathlib import Path

from benchmarks import methods_page

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_methods_page_is_current():
    assert (DOCS / "methods.md").read_text() == methods_page.page(), \
        "docs/methods.md is stale: run `python -m benchmarks.methods_page`"


def test_architectures_page_is_current():
    from benchmarks import architectures_page

    assert (DOCS / "architectures.md").read_text() == architectures_page.page(), \
        "docs/architectures.md is stale: run `python -m benchmarks.architectures_page`"
