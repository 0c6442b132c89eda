"""The generated conformance matrix: method registry x architecture registry x the tiny zoo.

Every (family, method variant) cell either applies with NO targets and passes every check, or is
refused with an UnsupportedArchitectureError that leaves the model untouched. Which one is
decided by the registries (Method.runs_on), and what a method promises (identity at init,
mergeable, its parameter-count formula, its variants) by the method's own `TestFacts`, so a new
method or family needs no edit here. The checks themselves are in tests/matrix_cell.py, shared
with tools/matrix.py, which writes the table in docs/architectures.md. Data-chosen methods
(SH-PEFT, SPT) take one batch of the family's inputs. tests/test_conformance.py keeps the
hand-written formulas on the three original families.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matrix_cell import FAMILY_ARCH, REFUSED_IN_FAMILY, ZOO, check_cell, variants
from models import zoo_model

from peftvision.architectures import get_architecture
from peftvision.targets import detect_architecture

# families whose tiny model is slower to run (diffusers), marked slow past the first of each kind
SLOW = {"sdxl-unet", "flux"}
CELLS = [pytest.param(family, label, cls, options, id=f"{family}-{label}",
                      marks=[pytest.mark.slow] if family in SLOW else [])
         for family in ZOO for label, cls, options in variants()]


@pytest.mark.parametrize("family", list(ZOO))
def test_family_is_recognised(family):
    assert detect_architecture(zoo_model(family)) == FAMILY_ARCH[family]


@pytest.mark.parametrize("family,label,cls,options", CELLS)
def test_cell(family, label, cls, options, tmp_path):
    check_cell(family, label, cls, options, tmp_path)  # asserts every check; refusals are checked too


def test_the_documented_matrix_is_current():
    """docs/matrix.json (python -m tools.matrix) has every cell of today's registries, the
    registries' refusals as refusals, and no crash or mismatch."""
    results = json.loads((Path(__file__).resolve().parents[1] / "docs" / "matrix.json").read_text())
    stale = "docs/matrix.json is stale: run `python -m tools.matrix`"
    assert results["methods"] == [label for label, _cls, _options in variants()], stale
    assert list(results["cells"]) == list(ZOO), stale
    for family, row in results["cells"].items():
        arch = get_architecture(FAMILY_ARCH[family])
        for label, cls, _options in variants():
            status = row[label]["status"]
            if not cls.runs_on(arch):
                assert status == "refused", (family, label, stale)
            else:  # a variant may need more than the family gives (TSA's β: a Linear head)
                allowed = label != cls.name or (family, cls.name) in REFUSED_IN_FAMILY
                assert status == "pass" or (status == "refused" and allowed), (family, label, stale)
    assert results["counts"]["crash"] == results["counts"]["mismatch"] == 0
