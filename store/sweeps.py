"""A sweep's records in the store: the sweep itself (`sweeps`) and one row per cell run (`sweep_cells`),
written by the store's one writer (`Store`) on the sweep's driver. A cell's run, when there is one, is an
ordinary run in `runs` (and its details), written by `Store.finish` just before the cell's row."""

from __future__ import annotations

from datetime import datetime, timezone

import duckdb
import pyarrow as pa

from workbench.errors import StoreError

from .writer import Store, failure_cause


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def begin_sweep(store: Store, sweep_id: str, name: str, n_cells: int, grid_json: str) -> None:
    """Record the sweep (once: a re-run keeps the first record)."""
    try:
        if not store.con.execute("SELECT 1 FROM sweeps WHERE sweep_id = ?", [sweep_id]).fetchall():
            store.con.execute("INSERT INTO sweeps VALUES (?, ?, ?, ?, ?)", [sweep_id, name, _now(), n_cells, grid_json])
    except duckdb.Error as err:
        raise StoreError(f"could not record sweep {sweep_id} in {store.path}: {failure_cause(err)}") from None


def finished_cells(store: Store, keys: list[str]) -> set[str]:
    """Of `keys`, the cells stored as done (in any sweep), whose run is still in the store."""
    if not keys:
        return set()
    store.con.register("_wanted", pa.table({"cell_key": pa.array(keys, pa.string())}))
    try:
        rows = store.con.execute("SELECT DISTINCT c.cell_key FROM sweep_cells c JOIN _wanted w USING (cell_key) "
                                 "JOIN runs r ON r.run_id = c.run_id WHERE c.status = 'done' AND r.status = 'done'"
                                 ).fetchall()
    finally:
        store.con.unregister("_wanted")
    return {r[0] for r in rows}


def record_cell(store: Store, sweep_id: str, cell_key: str, run_id: str | None, spec: str, prompt: str, seed: int,
                repeat: int, status: str, error: str | None, worker: str) -> None:
    try:
        store.con.execute("INSERT INTO sweep_cells VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          [sweep_id, cell_key, run_id, spec, prompt, seed, repeat, status, error, worker, _now()])
    except duckdb.Error as err:
        raise StoreError(f"could not record a cell of sweep {sweep_id} in {store.path}: {failure_cause(err)}") \
            from None
