"""The sweep driver: expand the grid, skip the cells already stored, run the rest on an executor with a
progress bar, and record each result as it arrives (its run, then its cell row) through the one store
writer."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from workbench.spec import RunSpec

from .executors import CellResult, LocalExecutor, RayExecutor
from .grid import Cell, Grid


@dataclass
class SweepReport:
    sweep_id: str
    name: str
    cells: int
    skipped: int  # already stored as done
    done: int = 0
    failed: int = 0
    wall_s: float = 0.0  # running the cells, model loads excluded
    load_s: list[float] = field(default_factory=list)  # model load per worker
    run_s: float = 0.0  # the runs' own time (their total_s), summed
    workers: int = 1
    token_ids: dict[str, list[int]] = field(default_factory=dict)  # cell key -> generated ids (cells run here)
    errors: list[str] = field(default_factory=list)

    @property
    def cells_per_min(self) -> float:
        ran = self.done + self.failed
        return 60 * ran / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def overhead_s(self) -> float:
        """Per cell, the worker time not spent inside the run: scheduling, transfer, store writes, waiting."""
        ran = self.done + self.failed
        return (self.wall_s * self.workers - self.run_s) / ran if ran else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"sweep_id": self.sweep_id, "name": self.name, "cells": self.cells, "skipped": self.skipped,
                "done": self.done, "failed": self.failed, "workers": self.workers, "wall_s": self.wall_s,
                "cells_per_min": self.cells_per_min, "overhead_s_per_cell": self.overhead_s,
                "load_s_per_worker": self.load_s, "run_s": self.run_s,
                "load_average_1_5_15_min": list(os.getloadavg())}  # at the end: how busy the machine was


def make_executor(grid: Grid, ray: bool = False, workers: int = 2, address: str | None = None,
                  threads: int | None = None) -> Callable[[], Any]:
    """A factory, so a sweep whose cells are all stored loads no model."""
    if ray:
        return lambda: RayExecutor(grid.model, grid.dtype, grid.device, workers, address, threads)
    return lambda: LocalExecutor(grid.model, grid.dtype, grid.device, threads)


def run_sweep(grid: Grid, executor: Callable[[], Any], store: Any = None, progress: bool = True,
              rerun: bool = False) -> SweepReport:
    """Run the grid's cells not already stored as done (all of them with `rerun`); `store` is a
    `workbench.store.Store` (or None)."""
    from workbench.store.sweeps import begin_sweep, finished_cells, record_cell

    cells = grid.cells()
    stored = finished_cells(store, [c.key for c in cells]) if store is not None and not rerun else set()
    todo = [c for c in cells if c.key not in stored]
    report = SweepReport(grid.sweep_id(), grid.name, len(cells), len(cells) - len(todo))
    if store is not None:
        begin_sweep(store, report.sweep_id, grid.name, len(cells), grid.to_json())
    if not todo:
        return report
    by_index = {c.index: c for c in todo}
    runner = executor()
    report.load_s, report.workers = list(runner.load_s), len(runner.load_s)
    start = time.perf_counter()
    try:
        with tqdm(total=len(todo), unit="cell", desc=f"sweep {grid.name or report.sweep_id}",
                  disable=not progress) as bar:
            for result in runner.run([c.to_dict() for c in todo]):
                _record(report, by_index[result.index], result, store, record_cell)
                bar.update(1)
                bar.set_postfix(done=report.done, failed=report.failed)
    finally:
        report.wall_s = time.perf_counter() - start
        runner.close()
    return report


def _record(report: SweepReport, cell: Cell, result: CellResult, store: Any, record_cell: Callable) -> None:
    trace = result.trace
    if trace is not None:
        report.run_s += trace.summary()["total_s"] or 0.0
        if result.status == "done":
            report.token_ids[cell.key] = list(trace.token_ids)
        if store is not None:
            store.finish(trace)
    if result.status == "done":
        report.done += 1
    else:
        report.failed += 1
        report.errors.append(f"cell {cell.index} ({cell.spec.to_string()}): {result.error}")
    if store is not None:
        configuration = dataclasses.replace(cell.spec, seed=RunSpec.seed).to_string()  # seeds group together
        record_cell(store, report.sweep_id, cell.key, trace.run_id if trace else None, configuration,
                    cell.prompt, cell.seed, cell.repeat, result.status, result.error, result.worker)
