"""Where a sweep's cells run: in this process (one Workbench, the model loaded once), or on Ray (one worker
actor per model replica, each loading the model once). Both yield a CellResult per cell as it finishes; the
driver (workbench/sweep/runner.py) is the only one that writes to the store."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from workbench.errors import WorkbenchError
from workbench.spec import RunSpec
from workbench.trace import Trace


@dataclass
class CellResult:
    index: int  # the cell's index in the sweep
    trace: Trace | None  # None when the cell failed before its run began (an empty prompt, ...)
    status: str  # done or failed
    error: str | None
    worker: str


def run_cell(wb: Any, cell: dict[str, Any], worker: str) -> CellResult:
    """Run one cell on a loaded Workbench; an exception fails the cell, not the sweep."""
    out: list[Trace] = []
    try:
        for _ in wb.stream(cell["prompt"], RunSpec.from_json(cell["spec"]), trace_out=out):
            pass
    except Exception as err:
        return CellResult(cell["index"], out[0] if out else None, "failed", f"{type(err).__name__}: {err}", worker)
    return CellResult(cell["index"], out[0], "done", None, worker)


class SweepWorker:
    """One model replica: loads the model once, then runs the cells it is given (in this process or as a Ray
    actor)."""

    def __init__(self, model: str, dtype: str, device: str, threads: int | None, name: str):
        import torch

        from workbench.api import Workbench

        if threads:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        self.wb = Workbench(model, dtype, device, freeze_gc=True)
        self.load_s = time.perf_counter() - start
        self.name = name

    def load_seconds(self) -> float:
        return self.load_s

    def run(self, cell: dict[str, Any]) -> CellResult:
        return run_cell(self.wb, cell, self.name)


class LocalExecutor:
    """Cells one after another in this process."""

    def __init__(self, model: str, dtype: str, device: str, threads: int | None = None):
        self.worker = SweepWorker(model, dtype, device, threads, "local")
        self.load_s = [self.worker.load_s]

    def run(self, cells: list[dict[str, Any]]) -> Iterator[CellResult]:
        for cell in cells:
            yield self.worker.run(cell)

    def close(self) -> None:
        pass


class RayExecutor:
    """Cells spread over `workers` Ray actors (one CPU each), each with its own copy of the model; a worker gets
    its next cell as soon as it returns one. Starts a local Ray instance unless Ray is already initialised or
    `address` names a cluster."""

    def __init__(self, model: str, dtype: str, device: str, workers: int, address: str | None = None,
                 threads: int | None = None):
        try:
            import ray
        except ImportError:
            raise WorkbenchError("--ray needs Ray: pip install -e '.[sweep]' (make setup installs it)") from None
        if workers < 1:
            raise WorkbenchError(f"--workers must be at least 1, got {workers}")
        self.ray = ray
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            local = address is None
            try:
                ray.init(address=address, num_cpus=workers if local else None, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError) as err:
                raise WorkbenchError(f"could not start or reach Ray at {address or 'a local instance'}: "
                                     f"{str(err).splitlines()[0]}") from None
        actor = ray.remote(num_cpus=1)(SweepWorker)
        self.actors = [actor.remote(model, dtype, device, threads, f"ray-{i}") for i in range(workers)]
        try:
            self.load_s = ray.get([a.load_seconds.remote() for a in self.actors])
        except ray.exceptions.RayError as err:
            self.close()
            raise WorkbenchError(f"a Ray worker could not load {model}: {str(err).splitlines()[0]}") from None

    def run(self, cells: list[dict[str, Any]]) -> Iterator[CellResult]:
        ray = self.ray
        todo = deque(cells)
        pending: dict[Any, tuple[Any, dict[str, Any]]] = {}  # object ref -> (actor, cell)

        def submit(actor: Any) -> None:
            if todo:
                cell = todo.popleft()
                pending[actor.run.remote(cell)] = (actor, cell)

        for a in self.actors:
            submit(a)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor, cell = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as err:  # the worker itself died: the cell fails, the others go on
                yield CellResult(cell["index"], None, "failed", f"Ray worker failed: {str(err).splitlines()[0]}",
                                 "ray")
                if not pending and todo:
                    raise WorkbenchError("every Ray worker has failed; the remaining cells were not run") from None
                continue
            submit(actor)
            yield result

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        if self.owns_ray:
            self.ray.shutdown()
