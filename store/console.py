"""Read-only access to a store, and the sealed SQL console.

A query passes two lines of defence. First DuckDB's own parser: exactly one statement, of a query type
(SELECT / WITH / FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN), reading only tables and views by name and no
file-reading table function. Then the connection itself: read-only, external access disabled and the
configuration locked, so even a query the first check missed cannot write, attach, load or read a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from workbench.errors import StoreError

from .database import connect, default_store_path, stored_version
from .schema import SCHEMA_VERSION

ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}  # DESCRIBE/SHOW/SUMMARIZE parse as SELECT
VALID = "valid: one SELECT (or WITH / FROM) query, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN"
# Table functions that only read the database itself; anything else (read_csv, glob, ...) is refused.
SAFE_TABLE_FUNCTIONS = {"range", "generate_series", "unnest", "summary", "repeat", "repeat_row"}


class Reader:
    """A read-only, sealed connection to a store file (default: `default_store_path()`)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser().resolve() if path is not None else default_store_path().resolve()
        self._open()
        if self._has_running_runs():
            # We could open the file, so no other process is writing it: its `running` runs were left by a
            # writer that died. A writer marks them interrupted on open; do that once, then read on.
            self.close()
            from .writer import Store

            try:
                Store(self.path).close()
            except StoreError:
                pass  # e.g. a read-only file: show the runs as stored
            self._open()

    def _open(self) -> None:
        self.con = connect(self.path, read_only=True)
        try:
            version = stored_version(self.con, self.path)
        except BaseException:
            self.close()
            raise
        if version != SCHEMA_VERSION:
            self.close()
            raise StoreError(f"{self.path} has store schema version {version}, this workbench reads "
                             f"{SCHEMA_VERSION}; record one run into it (`workbench generate --store ...`) to "
                             "migrate it")

    def _has_running_runs(self) -> bool:
        return self.con.execute("SELECT count(*) FROM runs WHERE status = 'running'").fetchall()[0][0] > 0

    def query(self, sql: str, params: list[Any] | None = None) -> pa.Table:
        """Run a vetted console query (see module docstring) and return its result as an Arrow table."""
        check_query(self.con, sql)
        return self._run(sql, params)

    def _run(self, sql: str, params: list[Any] | None = None) -> pa.Table:
        return run_sealed(self.con, sql, params)

    def runs(self, limit: int = 20) -> pa.Table:
        """Runs, newest first."""
        return self._run("SELECT run_id, created_at, status, model, spec, n_new_tokens, tok_per_s, "
                         "mean_accepted_length, finish_reason FROM runs ORDER BY created_at DESC LIMIT ?", [limit])

    def run(self, run_id: str) -> dict[str, Any]:
        """One run's row of `run_summary` with its error and text; a unique prefix of the id is enough."""
        rows = self._run("SELECT s.*, r.error, r.text, r.spec_json FROM run_summary s JOIN runs r USING (run_id) "
                         "WHERE starts_with(run_id, ?) LIMIT 2", [run_id]).to_pylist()
        if len(rows) != 1:
            what = "no run" if not rows else "more than one run"
            raise StoreError(f"{what} in {self.path} has an id starting with {run_id!r}; "
                             "`workbench runs` lists the ids")
        return rows[0]

    def table(self, name: str) -> pa.Table:
        """A whole table, for export."""
        return self._run(f'SELECT * FROM "{name}"')

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None  # type: ignore[assignment]

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_sealed(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> pa.Table:
    """Run SQL on a sealed connection, turning DuckDB's errors into one-line StoreErrors."""
    try:
        return con.sql(sql, params=params).to_arrow_table()
    except duckdb.PermissionException as err:
        raise StoreError(f"refused: the SQL console cannot read or write files ({_first_line(err)}); "
                         f"{VALID} over the store's tables and views") from None
    except duckdb.Error as err:
        raise StoreError(f"query failed: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


def check_query(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise StoreError unless `sql` is one read-only query over tables and views (no files, no settings)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as err:
        raise StoreError(f"not valid SQL: {_first_line(err)}") from None
    if len(statements) != 1:
        raise StoreError(f"refused: {len(statements)} statements given; the SQL console runs exactly one "
                         f"statement ({VALID})")
    kind = statements[0].type
    if kind not in ALLOWED:
        raise StoreError(f"refused: {kind.name} statements are not allowed in the read-only SQL console; {VALID}")
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    if tree.get("error"):  # DESCRIBE / SHOW / SUMMARIZE have no serialisable tree; the parser vetted their type
        return
    for node in _walk(tree):
        if node.get("type") == "TABLE_FUNCTION":
            name = node.get("function", {}).get("function_name", "").lower()
            if name not in SAFE_TABLE_FUNCTIONS:
                raise StoreError(f"refused: table function {name}() is not allowed in the SQL console (it may read "
                                 f"files); {VALID} over the store's tables and views")
        elif node.get("type") == "BASE_TABLE":
            name = node.get("table_name", "")
            if any(c in name for c in "./\\:") or node.get("catalog_name"):
                raise StoreError(f"refused: {name!r} is a file or another database, not a table of the store; "
                                 f"{VALID} over the store's tables and views")


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)
