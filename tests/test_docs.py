"""Generated documentation stays in step with the code."""

from pathlib import Path

from tools import methods_page

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_methods_page_is_current():
    assert (DOCS / "methods.md").read_text() == methods_page.page(), \
        "docs/methods.md is stale: run `python -m tools.methods_page`"


def test_reproduce_choices_in_the_benchmark_guide_are_current():
    from benchmarks.reproduce import choices

    assert choices.embedded((DOCS / "benchmarks.md").read_text()) == choices.markdown(), \
        "docs/benchmarks.md is stale: paste `python -m benchmarks.reproduce.choices` over its block"


def test_architectures_page_is_current():
    from tools import architectures_page

    assert (DOCS / "architectures.md").read_text() == architectures_page.page(), \
        "docs/architectures.md is stale: run `python -m tools.architectures_page`"
