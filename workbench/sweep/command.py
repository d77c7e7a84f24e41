"""`workbench sweep`: a grid file, or --spec / --axis options, over prompts; locally or on Ray."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.spec import DEFAULT_MODEL

from .grid import Grid, load_grid, long_context_prompts, read_prompts, suite_prompts


def add_sweep_command(sub: Any) -> None:
    from workbench.store.commands import add_recording_options

    p = sub.add_parser("sweep", help="run a grid of specs over prompts and seeds, locally or on Ray; resumable",
                       description="Every (spec, prompt, seed) cell is recorded in the store; running the same "
                       "sweep again skips the cells stored as done (docs/sweeps.md).")
    p.add_argument("grid", nargs="?", help="a grid file (.toml, .yaml); the options below add to or override it")
    p.add_argument("--spec", action="append", help="a base spec as a short string (repeatable)")
    p.add_argument("--axis", action="append", help="FIELD=V1,V2,... : a spec field (cache=h2o:budget=64,kivi) or "
                   "a technique parameter (decode.k=4,8) with its values; V1|V2 separates values that hold commas "
                   "(repeatable; each multiplies the cells)")
    p.add_argument("--prompts", help="a file of prompts, one per line")
    p.add_argument("--suite", help="comma-separated categories of the prompt suite (or 'all')")
    p.add_argument("--per-category", type=int, help="with --suite: prompts per category (default all)")
    p.add_argument("--long-context", metavar="LENGTHS", help="the long-context suite's prompts at these "
                   "comma-separated token lengths (e.g. 2048,4096; docs/performance.md, long context)")
    p.add_argument("--long-context-tasks", help="with --long-context: comma-separated tasks (passkey, kv, "
                   "summarization; default all)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seeds", help="comma-separated seeds (default 0)")
    p.add_argument("--repeats", type=int, help="runs of each cell (default 1)")
    p.add_argument("--name", help="the sweep's name in the store (default: the grid file's name)")
    p.add_argument("--model", help=f"default {DEFAULT_MODEL}")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: torch's own choice)")
    p.add_argument("--ray", action="store_true", help="run the cells on Ray workers (a local instance by default)")
    p.add_argument("--ray-address", help="with --ray: a Ray cluster's address (e.g. ray://head:10001 or auto)")
    p.add_argument("--workers", type=int, default=2, help="with --ray: worker actors, each loading the model once")
    p.add_argument("--json", help="also write the sweep's report (wall time, cells per minute, ...) to this file")
    p.add_argument("--rerun", action="store_true", help="run every cell, even those already stored as done")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_recording_options(p)
    p.set_defaults(func=cmd_sweep)


def grid_from_args(args: argparse.Namespace) -> Grid:
    grid = load_grid(args.grid, args.model) if args.grid else Grid()
    if args.spec:
        grid.specs = list(args.spec)
    for axis in args.axis or []:
        name, eq, values = axis.partition("=")
        if not eq or not name.strip() or not values:
            raise WorkbenchError(f"bad --axis {axis!r}; expected FIELD=V1,V2 (e.g. decode.k=4,8)")
        grid.axes[name.strip()] = values.split("|") if "|" in values else values.split(",")
    if args.long_context_tasks and not args.long_context:
        raise WorkbenchError("--long-context-tasks needs --long-context LENGTHS")
    given: list[str] = []  # the options' prompt sources add up, and together replace the grid file's
    if args.prompts:
        given += read_prompts(args.prompts)
    if args.suite:
        given += suite_prompts(None if args.suite == "all" else args.suite.split(","), args.per_category)
    if args.long_context:
        tasks = args.long_context_tasks.split(",") if args.long_context_tasks else None
        given += long_context_prompts(args.model or grid.model, args.long_context.split(","), tasks)
    if given:
        grid.prompts = given
    if args.seeds:
        try:
            grid.seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise WorkbenchError(f"bad --seeds {args.seeds!r}; expected comma-separated integers") from None
    for key in ("max_new_tokens", "repeats", "name", "model", "dtype", "device"):
        if getattr(args, key) is not None:
            setattr(grid, key, getattr(args, key))
    if not grid.name:
        grid.name = grid.sweep_id()
    return grid


def cmd_sweep(args: argparse.Namespace) -> int:
    from workbench.store.commands import open_recorder

    from .runner import make_executor, run_sweep

    if args.ray_address and not args.ray:
        raise WorkbenchError("--ray-address needs --ray")
    grid = grid_from_args(args)
    cells = grid.cells()  # checks every spec before a model loads
    executor = make_executor(grid, args.ray, args.workers, args.ray_address, args.threads)
    store = open_recorder(args)
    try:
        report = run_sweep(grid, executor, store, progress=not args.no_progress, rerun=args.rerun)
    finally:
        if store is not None:
            store.close()
    where = f"on Ray ({report.workers} workers)" if args.ray else "locally"
    print(f"sweep {report.name} ({report.sweep_id}): {len(cells)} cells, {report.skipped} already stored and "
          f"skipped, {report.done} done, {report.failed} failed, {where}")
    if report.done + report.failed:
        print(f"  {report.wall_s:.1f} s, {report.cells_per_min:.1f} cells/min, model load "
              f"{', '.join(f'{s:.1f}' for s in report.load_s)} s per worker, "
              f"{report.overhead_s * 1000:.0f} ms per cell outside the runs")
    for error in report.errors[:10]:
        print(f"  failed: {error}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return 1 if report.failed else 0
