"""`python -m benchmarks reproduce NAME`: the papers' tables and figures, one command each."""

from __future__ import annotations

from . import dutt, shpeft
from .grid import Choice, Grid, Run

GRIDS = {"table2": dutt.table2, "table3": dutt.table3, "table4": dutt.table4, "table5": dutt.table5,
         "figure1": dutt.figure1, "figure3": dutt.figure3, "shpeft-table1": shpeft.table1,
         "shpeft-figure4": shpeft.figure4, "shpeft-ablations": shpeft.ablations}

__all__ = ["GRIDS", "Choice", "Grid", "Run"]
