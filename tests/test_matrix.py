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

import pytest
from matrix_cell import FAMILY_ARCH, ZOO, check_cell, variants
from models import zoo_model

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
