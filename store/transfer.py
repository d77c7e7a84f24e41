"""Parquet export and import: one file per table, through pyarrow (the store's connections never touch files).

Import checks the whole export first (`validate.check_export`: schema, ids, JSON, statuses, orphans,
invariants), then appends the runs that the store does not hold yet (by run_id), with their details, in one
transaction; runs already present are skipped, so importing the same folder twice changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workbench.errors import StoreError

from .console import Reader
from .schema import SCHEMA_VERSION, TABLES
from .validate import check_export
from .writer import Store


def export_parquet(reader: Reader, folder: str | Path) -> dict[str, int]:
    """Write every table to `folder/<table>.parquet`; returns rows written per table."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"{folder} exists and is not a folder; --parquet takes a folder for <table>.parquet files "
                         "(a new one, or an earlier export to overwrite)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"cannot create the export folder {folder}: {err.strerror}") from None
    counts = {}
    for name in TABLES:
        table = reader.table(name)
        table = table.replace_schema_metadata({"workbench_store_schema": str(SCHEMA_VERSION)})
        try:
            pq.write_table(table, folder / f"{name}.parquet")
        except OSError as err:
            raise StoreError(f"cannot write {folder / (name + '.parquet')}: {err}") from None
        counts[name] = table.num_rows
    return counts


def import_parquet(store: Store, folder: str | Path) -> dict[str, int]:
    """Append the runs in `folder` that `store` lacks; returns rows added per table."""
    folder = Path(folder).expanduser()
    missing = [name for name in TABLES if not (folder / f"{name}.parquet").is_file()]
    if missing:
        raise StoreError(f"{folder} is not a store export: it lacks {', '.join(m + '.parquet' for m in missing)} "
                         "(`workbench export --parquet DIR` writes all five)")
    tables: dict[str, pa.Table] = {}
    for name in TABLES:
        try:
            tables[name] = pq.read_table(folder / f"{name}.parquet")
        except (pa.ArrowInvalid, OSError) as err:
            raise StoreError(f"cannot read {folder / (name + '.parquet')}: {err}") from None
        version = (tables[name].schema.metadata or {}).get(b"workbench_store_schema", b"0").decode()
        if version != str(SCHEMA_VERSION):
            raise StoreError(f"{folder} was exported with store schema {version}; this workbench imports "
                             f"schema {SCHEMA_VERSION} exports only")
    expected = {name: store.con.sql(f"SELECT * FROM {name} LIMIT 0").to_arrow_table().schema for name in TABLES}
    check_export(folder, tables, expected)
    known = {r[0] for r in store.con.execute("SELECT run_id FROM runs").fetchall()}
    new_ids = pa.array(sorted(set(tables["runs"].column("run_id").to_pylist()) - known), pa.string())
    tables = {name: t.filter(pc.is_in(t.column("run_id"), value_set=new_ids)) for name, t in tables.items()}
    store.append_tables(tables)
    return {name: t.num_rows for name, t in tables.items()}
