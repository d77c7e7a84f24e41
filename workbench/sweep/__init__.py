"""Sweeps: a grid of configurations over prompts, seeds and repeats, run in this process or on Ray, each cell
recorded in the store and skipped when the sweep is run again (docs/sweeps.md).

    from workbench.sweep import Grid, make_executor, run_sweep
    grid = Grid(specs=["", "decode=prompt_lookup:k=8"], prompts=["Why is the sky blue?"], max_new_tokens=32)
    report = run_sweep(grid, make_executor(grid), store=Store("runs.duckdb"))
"""

import importlib

# Imported on first use: the CLI builds the `sweep` parser (workbench.sweep.command) for every command, and the
# executors load torch, which must not happen before a second store writer is refused.
_EXPORTS = {"CellResult": "executors", "LocalExecutor": "executors", "RayExecutor": "executors", "Cell": "grid",
            "Grid": "grid", "cell_key": "grid", "load_grid": "grid", "SweepReport": "runner",
            "make_executor": "runner", "run_sweep": "runner"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'workbench.sweep' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
