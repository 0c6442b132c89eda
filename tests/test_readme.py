"""The README starts with the two set-up commands and lists every registered method."""

from pathlib import Path

import peftvision as pv
from tools import readme_methods

README = Path(__file__).resolve().parents[1] / "README.md"


def test_method_table_is_current():
    text = README.read_text()
    assert text == readme_methods.render(text), \
        "README.md's method table is stale: run `python -m tools.readme_methods`"
    for name in pv.methods():
        assert f"| `{name}`" in text


def test_readme_starts_with_the_two_setup_commands():
    first_block = README.read_text().split("```")[1].strip().splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]


def test_a_new_method_enters_the_table(monkeypatch):
    from dataclasses import dataclass
    from typing import ClassVar

    from peftvision import registry
    from peftvision.methods.base import Method

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))

    @registry.register_method
    @dataclass
    class Zeta(Method):
        name: ClassVar[str] = "zeta"
        summary: ClassVar[str] = "a method added later"

    assert "| `zeta` | selective | a method added later |" in readme_methods.table()
