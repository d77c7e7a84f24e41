"""Read-only access to a store, and the sealed SQL console with its limits.

A query passes three lines of defence. First an allow-list over DuckDB's own parse tree
(`json_serialize_sql`): exactly one statement, a query (SELECT / WITH / FROM / VALUES, DESCRIBE, SHOW TABLES,
SUMMARIZE, or EXPLAIN of one; never EXPLAIN ANALYZE, which runs its statement), every query node a SELECT
(so no `WITH x AS (DELETE ... RETURNING *)`), every table a table or view of the store or a CTE of the
query, every table function a generator (`range`, `unnest`, ...), and no function that discloses settings,
paths or the environment (`current_setting`, `getenv`, `duckdb_*`, `pragma_*`, `pg_*`). Then the
transaction: the query runs in a READ ONLY transaction, rolled back afterwards. Then the connection: external
access disabled and the configuration locked, so nothing reads a file or changes a setting.

Every query also runs under `Limits`: a time limit (the query is interrupted), a row limit (the result is
cut, and says so) and a memory limit (DuckDB's own, with no spilling to disk, and a cap on the result held).
A `Cancel` stops a running query from another thread.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from workbench.errors import StoreError

from .database import connect, default_store_path, stored_version
from .schema import SCHEMA_VERSION, SWEEP_TABLES, TABLES, VIEW_NAMES

VALID = "valid: one SELECT (or WITH / FROM / VALUES) query, DESCRIBE, SHOW TABLES, SUMMARIZE or EXPLAIN"
# Table functions that only generate rows; anything else (read_csv, glob, duckdb_settings, ...) is refused.
SAFE_TABLE_FUNCTIONS = {"range", "generate_series", "unnest", "repeat", "repeat_row"}
QUERY_NODES = {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}
TABLE_REFS = {"BASE_TABLE", "TABLE_FUNCTION", "JOIN", "SUBQUERY", "EXPRESSION_LIST", "EMPTY", "PIVOT", "SHOW_REF"}
# Functions that disclose the store's path, its settings, temp or secret directories, or the environment.
DISCLOSING = re.compile(r"(current_setting|getenv|which_secret|query|query_table|duckdb_\w*|pragma_\w*|pg_\w*)")
_EXPLAIN = re.compile(r"\s*EXPLAIN\s+", re.IGNORECASE)
_ANALYZE = re.compile(r"ANALY[SZ]E\b", re.IGNORECASE)
ROW_LIMIT_KEY = b"workbench_row_limit"  # schema metadata of a result cut at the row limit
_BATCH_ROWS = 2048


@dataclass(frozen=True)
class Limits:
    """What one console query may use: seconds (0: no limit), rows returned, and memory in MiB (DuckDB's
    working memory, and separately the result held in Python)."""

    timeout_s: float = 10.0
    max_rows: int = 10_000
    memory_mib: int = 1024

    def checked(self) -> Limits:
        if self.timeout_s < 0 or self.max_rows < 1 or self.memory_mib < 16:
            raise StoreError(f"query limits out of range (timeout {self.timeout_s:g} s, {self.max_rows} rows, "
                             f"{self.memory_mib} MiB); valid: timeout >= 0 (0: none), rows >= 1, memory >= 16 MiB")
        return self


class Cancel:
    """Stops a console query that another thread is running (the app's Cancel button). One per query."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._con is not None:
                self._con.interrupt()

    def _attach(self, con: duckdb.DuckDBPyConnection | None) -> None:
        with self._lock:
            self._con = con
            if con is not None and self.cancelled:
                con.interrupt()


class Reader:
    """A read-only, sealed connection to a store file (default: `default_store_path()`)."""

    def __init__(self, path: str | Path | None = None, limits: Limits | None = None):
        self.path = Path(path).expanduser().resolve() if path is not None else default_store_path().resolve()
        self.limits = (limits or Limits()).checked()
        version = self._open()
        if version < SCHEMA_VERSION or self._has_running_runs():
            # An older store is migrated, and `running` runs are marked interrupted, by opening it once as a
            # writer. We could open the file, so no other process is writing it: its `running` runs were left
            # by a writer that died.
            self.close()
            from .writer import Store

            try:
                Store(self.path).close()
            except StoreError:
                if version < SCHEMA_VERSION:
                    raise
                # e.g. a read-only file: show the runs as stored
            version = self._open()
        if version != SCHEMA_VERSION:
            self.close()
            raise StoreError(f"{self.path} has store schema version {version}, this workbench reads "
                             f"{SCHEMA_VERSION}; open it for writing once (`workbench generate --store ...`) to "
                             "migrate it")

    def _open(self) -> int:
        self.con = connect(self.path, read_only=True, memory_mib=self.limits.memory_mib)
        try:
            return stored_version(self.con, self.path)
        except BaseException:
            self.close()
            raise

    def _has_running_runs(self) -> bool:
        return self.con.execute("SELECT count(*) FROM runs WHERE status = 'running'").fetchall()[0][0] > 0

    def query(self, sql: str, params: list[Any] | None = None, limits: Limits | None = None,
              cancel: Cancel | None = None) -> pa.Table:
        """Run a vetted console query (see module docstring) under `limits` (default: the reader's) and return
        its result as an Arrow table; `row_limit_note(table)` says whether it was cut."""
        check_query(self.con, sql)
        return run_limited(self.con, sql, params, limits or self.limits, cancel)

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
    except duckdb.Error as err:
        raise _store_error(err) from None


def run_limited(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None, limits: Limits,
                cancel: Cancel | None = None) -> pa.Table:
    """Run a vetted query in a READ ONLY transaction under `limits`, streaming its result in batches."""
    limits = limits.checked()
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        con.interrupt()

    timer = threading.Timer(limits.timeout_s, expire) if limits.timeout_s else None
    if cancel is not None:
        cancel._attach(con)
    reader = None
    try:
        con.execute("BEGIN TRANSACTION READ ONLY")
        if timer is not None:
            timer.start()
        reader = con.sql(sql, params=params).to_arrow_reader(_BATCH_ROWS)
        batches, rows, held, cut = [], 0, 0, False
        for batch in reader:
            rows += batch.num_rows
            held += batch.nbytes
            if held > limits.memory_mib << 20:
                raise StoreError(f"query stopped: its result passed the memory limit of {limits.memory_mib} MiB; "
                                 "select fewer columns or rows, or raise the limit (`workbench sql --memory-mib`)")
            batches.append(batch)
            if rows > limits.max_rows:
                cut = True
                break
        table = pa.Table.from_batches(batches, schema=reader.schema).slice(0, limits.max_rows)
        if cut:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                   ROW_LIMIT_KEY: str(limits.max_rows).encode()})
        return table
    except (duckdb.InterruptException, OSError, pa.ArrowException) as err:
        # an interrupt that lands while the result streams comes through pyarrow's reader as an OSError
        if not isinstance(err, duckdb.InterruptException) and "INTERRUPT" not in str(err):
            raise StoreError(f"query failed: {_first_line(err)}") from None
        if timed_out.is_set():
            raise StoreError(f"query stopped: it ran past the time limit of {limits.timeout_s:g} s; narrow it "
                             "(WHERE, LIMIT) or raise the limit (`workbench sql --timeout`)") from None
        raise StoreError("query cancelled") from None
    except duckdb.OutOfMemoryException:
        raise StoreError(f"query stopped: it needed more than the memory limit of {limits.memory_mib} MiB; "
                         "narrow it or raise the limit (`workbench sql --memory-mib`)") from None
    except duckdb.Error as err:
        raise _store_error(err) from None
    finally:
        if timer is not None:
            timer.cancel()
        if cancel is not None:
            cancel._attach(None)
        if reader is not None:
            reader.close()  # a result cut at the row limit is still streaming: end it before the rollback
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # no transaction began (an error before BEGIN took effect)


def row_limit_note(table: pa.Table) -> str | None:
    """"the first N rows (the row limit)" when a console result was cut at its row limit, else None."""
    limit = (table.schema.metadata or {}).get(ROW_LIMIT_KEY)
    if limit is None:
        return None
    return f"the first {int(limit):,} rows only: the query hit the row limit (`workbench sql --max-rows` to change)"


def _store_error(err: duckdb.Error) -> StoreError:
    if isinstance(err, duckdb.PermissionException):
        return StoreError(f"refused: the SQL console cannot read or write files ({_first_line(err)}); "
                          f"{VALID} over the store's tables and views")
    if isinstance(err, duckdb.InterruptException):
        return StoreError("query interrupted")
    return StoreError(f"query failed: {_first_line(err)}")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


def check_query(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise StoreError unless `sql` is one read-only query over the store's tables and views (see the module
    docstring for the rules)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as err:
        raise StoreError(f"not valid SQL: {_first_line(err)}") from None
    if len(statements) != 1:
        raise StoreError(f"refused: {len(statements)} statements given; the SQL console runs exactly one "
                         f"statement ({VALID})")
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:
        head = _EXPLAIN.match(sql)
        if head is None or _ANALYZE.match(sql, head.end()):
            raise StoreError(f"refused: EXPLAIN ANALYZE (it runs its statement), or EXPLAIN not at the start; {VALID}")
        sql = sql[head.end():]
        kinds = [s.type for s in duckdb.extract_statements(sql)]
        if kinds != [duckdb.StatementType.SELECT]:
            raise StoreError(f"refused: EXPLAIN of a {kinds[0].name if kinds else 'missing'} statement; {VALID}")
    elif kind != duckdb.StatementType.SELECT:
        raise StoreError(f"refused: {kind.name} statements are not allowed in the read-only SQL console; {VALID}")
    try:
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    except RecursionError:
        raise StoreError("refused: the query nests too deeply to be checked (such as hundreds of chained + or "
                         "nested calls); write it with fewer levels, e.g. sum() over a list or a table") from None
    if tree.get("error"):
        raise StoreError(f"refused: not a plain query ({tree.get('error_message', 'unparsable')}); {VALID}")
    _check_tree(tree)


def _check_tree(tree: dict) -> None:
    ctes = {entry["key"].lower() for node in _walk(tree) if isinstance(node.get("cte_map"), dict)
            for entry in node["cte_map"].get("map", [])}
    allowed = set(TABLES) | set(SWEEP_TABLES) | set(VIEW_NAMES) | ctes
    where = f"{VALID} over the store's tables ({', '.join(TABLES + SWEEP_TABLES)}) and views ({', '.join(VIEW_NAMES)})"
    for node in _walk(tree):
        kind = node.get("type")
        if not isinstance(kind, str):
            continue
        if node.get("class") == "FUNCTION" and DISCLOSING.fullmatch(node.get("function_name", "").lower()):
            raise StoreError(f"refused: {node['function_name']}() discloses settings, paths or the environment; "
                             f"{where}")
        if "class" in node:
            continue
        if kind.endswith("_NODE"):
            if kind not in QUERY_NODES:
                what = kind.removesuffix("_QUERY_NODE").removesuffix("_NODE")
                raise StoreError(f"refused: {what} inside the query (the console only reads); {where}")
        elif "sample" in node and "alias" in node and kind not in TABLE_REFS:  # the marks of a table reference
            raise StoreError(f"refused: a {kind} table reference; {where}")
        if kind == "TABLE_FUNCTION":
            name = node.get("function", {}).get("function_name", "").lower()
            if name not in SAFE_TABLE_FUNCTIONS:
                raise StoreError(f"refused: table function {name}() is not allowed in the SQL console (it may read "
                                 f"files or disclose settings); {where}")
        elif kind == "BASE_TABLE":
            _check_table(node.get("catalog_name", ""), node.get("schema_name", ""), node.get("table_name", ""),
                         allowed, where)
        elif kind == "SHOW_REF":
            name = node.get("table_name", "").strip('"').lower()
            if node.get("show_type") == "SHOW_SPECIAL":
                if name != "tables":
                    raise StoreError(f"refused: SHOW {name.upper()}; SHOW TABLES is allowed; {where}")
            elif name:
                _check_table(node.get("catalog_name", ""), node.get("schema_name", ""), name, allowed, where)


def _check_table(catalog: str, schema: str, name: str, allowed: set[str], where: str) -> None:
    if any(c in name for c in "./\\:") or catalog:
        raise StoreError(f"refused: {name!r} is a file or another database, not a table of the store; {where}")
    if schema.lower() not in ("", "main") or name.lower() not in allowed:
        full = f"{schema}.{name}" if schema else name
        raise StoreError(f"refused: {full} is not a table or view of the store; {where}")


def _walk(tree: Any) -> Any:
    """Every dict in a parse tree, depth first, without recursion (deep trees are legal SQL)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list):
            stack.extend(reversed(node))
