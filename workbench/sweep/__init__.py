"""Sweeps: a grid of configurations over prompts, seeds and repeats, run in this process or on Ray, each cell
recorded in the store and skipped when the sweep is run again (docs/sweeps.md).

    from workbench.sweep import Grid, make_executor, run_sweep
    grid = Grid(specs=["", "decode=prompt_lookup:k=8"], prompts=["Why is the sky blue?"], max_new_tokens=32)
    report = run_sweep(grid, make_executor(grid), store=Store("runs.duckdb"))
"""

from .executors import CellResult, LocalExecutor, RayExecutor
from .grid import Cell, Grid, cell_key, load_grid
from .runner import SweepReport, make_executor, run_sweep

__all__ = ["Cell", "CellResult", "Grid", "LocalExecutor", "RayExecutor", "SweepReport", "cell_key", "load_grid",
           "make_executor", "run_sweep"]
