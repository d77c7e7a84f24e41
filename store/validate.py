"""Checks on an export before any of it is imported: schema, ids, JSON, statuses, orphans and the invariants.

Each problem is a StoreError naming the file, the row (0-based, as pyarrow reads it) and the column, so an
export is imported whole or not at all, and never leaves the store with rows its views cannot read.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from workbench.errors import StoreError

STATUSES = ("done", "failed", "interrupted", "running")
_JSON_COLUMNS = ("spec_json", "provenance")


def check_export(folder: Path, tables: dict[str, pa.Table], expected: dict[str, pa.Schema]) -> None:
    """Raise StoreError at the first problem in `tables` (read from `folder`); `expected`: the store's schemas."""
    for name, schema in expected.items():
        _check_schema(folder / f"{name}.parquet", tables[name].schema, schema)
    runs = tables["runs"]
    ids = _check_runs(folder / "runs.parquet", runs)
    for name in expected:
        if name != "runs":
            _check_orphans(folder / f"{name}.parquet", tables[name], ids)
    _check_invariants(folder, runs, tables["steps"], tables["tokens"], tables["draft_nodes"])


def _check_schema(file: Path, got: pa.Schema, want: pa.Schema) -> None:
    for field in want:
        if field.name not in got.names:
            raise StoreError(f"{file}: column {field.name} is missing (the store's {file.stem} table has it, "
                             f"type {field.type})")
        have = got.field(field.name).type
        if have != field.type and not (pa.types.is_null(have)):
            raise StoreError(f"{file}: column {field.name} has type {have}; the store's is {field.type}")
    extra = [n for n in got.names if n not in want.names]
    if extra:
        raise StoreError(f"{file}: unknown column {extra[0]}; the store's {file.stem} table has "
                         f"{', '.join(want.names)}")


def _check_runs(file: Path, runs: pa.Table) -> set[str]:
    seen: dict[str, int] = {}
    columns = {name: runs.column(name).to_pylist() for name in ("run_id", "status", *_JSON_COLUMNS)}
    for row in range(runs.num_rows):
        run_id = columns["run_id"][row]
        if not isinstance(run_id, str) or not run_id:
            raise StoreError(f"{file} row {row}, column run_id: {run_id!r}; a run id is a non-empty string")
        if run_id in seen:
            raise StoreError(f"{file} rows {seen[run_id]} and {row}, column run_id: the run {run_id!r} appears "
                             "twice; an export holds each run once")
        seen[run_id] = row
        status = columns["status"][row]
        if status not in STATUSES:
            raise StoreError(f"{file} row {row} (run {run_id!r}), column status: {status!r} is not a status "
                             f"(valid: {', '.join(STATUSES)})")
        for name in _JSON_COLUMNS:
            text = columns[name][row]
            if text is None:
                continue
            try:
                value = json.loads(text)
            except ValueError as err:
                raise StoreError(f"{file} row {row} (run {run_id!r}), column {name}: not valid JSON ({err})") from None
            if not isinstance(value, dict):
                raise StoreError(f"{file} row {row} (run {run_id!r}), column {name}: a JSON "
                                 f"{type(value).__name__}, not an object")
    return set(seen)


def _check_orphans(file: Path, table: pa.Table, ids: set[str]) -> None:
    for row, run_id in enumerate(table.column("run_id").to_pylist()):
        if not isinstance(run_id, str) or run_id not in ids:
            raise StoreError(f"{file} row {row}, column run_id: {run_id!r} is not a run of runs.parquet (an "
                             "orphan row); an export's rows all belong to its runs")


def _rows(table: pa.Table, columns: tuple[str, ...]) -> list[tuple[int, dict[str, Any]]]:
    data = {name: table.column(name).to_pylist() for name in columns}
    return [(row, {name: data[name][row] for name in columns}) for row in range(table.num_rows)]


def _check_invariants(folder: Path, runs: pa.Table, steps: pa.Table, tokens: pa.Table, nodes: pa.Table) -> None:
    """docs/store.md's invariants: steps 0..n-1 and n_new_tokens = sum(accepted + bonus) over them, target
    forwards = steps, mean accepted length = n_new_tokens / target_forwards, token positions without gaps,
    every accepted draft node's parent the root or accepted."""
    per_run: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for row, values in _rows(steps, ("run_id", "step", "tokens_accepted", "bonus_token")):
        per_run[values["run_id"]].append((row, values))
    file = folder / "runs.parquet"
    for row, run in _rows(runs, ("run_id", "n_new_tokens", "target_forwards", "mean_accepted_length")):
        rid, its = run["run_id"], per_run.get(run["run_id"], [])
        numbers = sorted(v["step"] for _, v in its)
        if numbers != list(range(len(its))):
            raise StoreError(f"{folder / 'steps.parquet'} rows of run {rid!r}, column step: {numbers[:8]} is not "
                             "0, 1, ... without gaps or repeats")
        generated = sum((v["tokens_accepted"] or 0) + bool(v["bonus_token"]) for _, v in its)
        if run["n_new_tokens"] is not None and its and run["n_new_tokens"] != generated:
            raise StoreError(f"{file} row {row} (run {rid!r}), column n_new_tokens: {run['n_new_tokens']}, but its "
                             f"steps generate {generated} (the sum of tokens_accepted + bonus_token)")
        if run["target_forwards"] is not None and its and run["target_forwards"] != len(its):
            raise StoreError(f"{file} row {row} (run {rid!r}), column target_forwards: {run['target_forwards']}, "
                             f"but it has {len(its)} steps")
        mal, forwards = run["mean_accepted_length"], run["target_forwards"]
        if mal is not None and forwards and run["n_new_tokens"] is not None and \
                abs(mal - run["n_new_tokens"] / forwards) > 1e-6 * max(1.0, abs(mal)):
            raise StoreError(f"{file} row {row} (run {rid!r}), column mean_accepted_length: {mal}, but "
                             f"n_new_tokens / target_forwards is {run['n_new_tokens'] / forwards:g}")
    positions: dict[str, list[int]] = defaultdict(list)
    for _, values in _rows(tokens, ("run_id", "position")):
        positions[values["run_id"]].append(values["position"])
    for rid, seen in positions.items():
        if sorted(seen) != list(range(len(seen))):
            raise StoreError(f"{folder / 'tokens.parquet'} rows of run {rid!r}, column position: not 0, 1, ... "
                             "without gaps or repeats")
    accepted = {(v["run_id"], v["step"], v["node"]): v["accepted"]
                for _, v in _rows(nodes, ("run_id", "step", "node", "accepted"))}
    for row, v in _rows(nodes, ("run_id", "step", "node", "parent", "accepted")):
        if v["accepted"] and v["parent"] >= 0 and not accepted.get((v["run_id"], v["step"], v["parent"])):
            raise StoreError(f"{folder / 'draft_nodes.parquet'} row {row} (run {v['run_id']!r}), column accepted: "
                             f"node {v['node']} is accepted but its parent {v['parent']} is not")
