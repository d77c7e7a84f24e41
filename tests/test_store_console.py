"""The SQL console under attack: a table of hostile inputs, and limits on time, rows and memory."""

import threading
import time

import pytest

from workbench.errors import StoreError
from workbench.store import Reader, Store, StoreThread
from workbench.store.console import Cancel, Limits, row_limit_note

READ_CSV = "SELECT * FROM read_csv('/etc/passwd')"
HOSTILE = [
    # writes, hidden in a query
    ("WITH x AS (DELETE FROM runs RETURNING *) SELECT count(*) FROM x", "DELETE inside"),
    ("WITH x AS (UPDATE runs SET status = 'done' RETURNING *) SELECT * FROM x", "UPDATE inside"),
    ("WITH x AS (INSERT INTO runs (run_id, status) VALUES ('a', 'done') RETURNING *) SELECT * FROM x", "INSERT inside"),
    ("SELECT * FROM (WITH x AS (DELETE FROM steps RETURNING *) SELECT * FROM x)", "DELETE inside"),
    ("SELECT (WITH x AS (DELETE FROM runs RETURNING 1) SELECT count(*) FROM x)", "DELETE inside"),
    # EXPLAIN
    (f"EXPLAIN ANALYZE {READ_CSV}", "EXPLAIN ANALYZE"),
    ("EXPLAIN ANALYZE DELETE FROM runs", "EXPLAIN ANALYZE"),
    ("explain   analyse SELECT 1", "EXPLAIN ANALYZE"),
    ("EXPLAIN ANALYZE SELECT count(*) FROM runs", "EXPLAIN ANALYZE"),
    ("/* c */ EXPLAIN SELECT 1", "EXPLAIN not at the start"),
    ("EXPLAIN DELETE FROM runs", "EXPLAIN of a DELETE"),
    ("EXPLAIN DROP TABLE runs", "EXPLAIN of a DROP"),
    (f"EXPLAIN {READ_CSV}", "read_csv"),
    # disclosing the store's path, settings, temp and secret directories, the environment
    ("SELECT * FROM pg_settings", "pg_settings is not a table"),
    ("SELECT * FROM pg_catalog.pg_settings", "not a table"),
    ("SELECT * FROM main.pg_settings", "not a table"),
    ("SELECT * FROM pragma_database_list", "pragma_database_list is not a table"),
    ("SELECT * FROM pragma_database_list()", "pragma_database_list"),
    ("SELECT * FROM duckdb_settings()", "duckdb_settings"),
    ("FROM duckdb_databases()", "duckdb_databases"),
    ("FROM duckdb_databases", "duckdb_databases is not a table"),
    ("SELECT * FROM duckdb_secrets()", "duckdb_secrets"),
    ("SELECT * FROM duckdb_temporary_files()", "duckdb_temporary_files"),
    ("SELECT * FROM duckdb_extensions()", "duckdb_extensions"),
    ("SELECT * FROM duckdb_memory()", "duckdb_memory"),
    ("SELECT current_setting('temp_directory')", "current_setting() discloses"),
    ("SELECT current_setting('secret_directory')", "current_setting() discloses"),
    ("SELECT (SELECT current_setting('temp_directory'))", "current_setting() discloses"),
    ("SELECT getenv('HOME')", "getenv() discloses"),
    ("SELECT which_secret('s3://x', 's3')", "which_secret() discloses"),
    ("SELECT * FROM information_schema.tables", "not a table"),
    ("SELECT * FROM runs JOIN pg_settings ON true", "pg_settings"),
    ("SELECT 1 UNION ALL SELECT * FROM duckdb_settings()", "duckdb_settings"),
    ("SHOW databases", "SHOW DATABASES"),
    ("SHOW ALL TABLES", "SHOW TABLES is allowed"),
    ("DESCRIBE pg_settings", "pg_settings"),
    ("SUMMARIZE duckdb_settings", "duckdb_settings"),
    # files and other databases
    (READ_CSV, "read_csv"),
    ("SELECT * FROM read_parquet('x.parquet')", "read_parquet"),
    ("SELECT * FROM read_text('/etc/passwd')", "read_text"),
    ("SELECT * FROM read_blob('/etc/passwd')", "read_blob"),
    ("SELECT * FROM read_json_auto('/etc/passwd')", "read_json_auto"),
    ("SELECT * FROM sniff_csv('/etc/passwd')", "sniff_csv"),
    ("SELECT * FROM parquet_metadata('x.parquet')", "parquet_metadata"),
    ("SELECT * FROM glob('*')", "glob"),
    ("SELECT * FROM query('SELECT 1')", "query"),
    ("SELECT * FROM query_table('runs')", "query_table"),
    (f"DESCRIBE {READ_CSV}", "read_csv"),
    ("SUMMARIZE SELECT * FROM read_text('/etc/passwd')", "read_text"),
    (f"SELECT * FROM runs WHERE run_id IN ({READ_CSV})", "read_csv"),
    ("SELECT * FROM 'file.csv'", "is a file"),
    ("SELECT * FROM 'runs.duckdb'", "is a file"),
    ("SELECT * FROM '/etc/passwd'", "is a file"),
    ('SELECT * FROM "../runs"', "is a file"),
    ("SELECT * FROM runs.main.runs", "another database"),
    ("SELECT * FROM system.main.duckdb_settings", "another database"),
    ("SELECT * FROM nosuch", "nosuch is not a table"),
    # statements that are not queries
    ("INSERT INTO runs (run_id, status) VALUES ('x', 'done')", "INSERT"),
    ("UPDATE runs SET status = 'done'", "UPDATE"),
    ("DELETE FROM runs", "DELETE"),
    ("TRUNCATE runs", "DELETE"),
    ("CREATE TABLE x (a INTEGER)", "CREATE"),
    ("CREATE VIEW v AS SELECT 1", "CREATE"),
    ("CREATE MACRO m(a) AS a", "CREATE"),
    ("CREATE SECRET s (TYPE s3)", "CREATE"),
    ("DROP TABLE runs", "DROP"),
    ("DROP VIEW run_summary", "DROP"),
    ("ALTER TABLE runs ADD COLUMN x INT", "ALTER"),
    ("CHECKPOINT", "CALL"),
    ("FORCE CHECKPOINT", "CALL"),
    ("CALL pragma_database_list()", "CALL"),
    ("VACUUM", "VACUUM"),
    ("ANALYZE", "VACUUM"),
    ("EXPORT DATABASE 'x'", "EXPORT"),
    ("IMPORT DATABASE 'x'", "PRAGMA"),
    ("ATTACH 'other.duckdb'", "ATTACH"),
    ("ATTACH ':memory:' AS m", "ATTACH"),
    ("DETACH runs", "DETACH"),
    ("USE memory", "SET"),
    ("COPY runs TO 'out.csv'", "COPY"),
    ("COPY (SELECT 1) TO 'out.csv'", "COPY"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("PRAGMA version", "PRAGMA"),
    ("PRAGMA database_list", "PRAGMA"),
    ("SET threads = 1", "SET"),
    ("SET memory_limit = '100GB'", "SET"),
    ("SET VARIABLE x = 1", "SET"),
    ("RESET threads", "SET"),
    ("BEGIN TRANSACTION", "TRANSACTION"),
    ("COMMIT", "TRANSACTION"),
    ("ROLLBACK", "TRANSACTION"),
    ("PIVOT runs ON status", "MULTI"),
    ("SELECT 1; DROP TABLE runs", "2 statements"),
    ("SELECT 1; SELECT 2", "2 statements"),
    ("SELECT 1;;DELETE FROM runs", "2 statements"),
    ("SELEC 1", "not valid SQL"),
    ("SELECT " + "+".join(["1"] * 400), "nests too deeply"),
    ("SELECT " + "+".join(["1"] * 3000), "not valid SQL"),
]
ALLOWED = ["SELECT 1", "WITH a AS (SELECT * FROM runs) SELECT count(*) FROM a", "FROM steps", "VALUES (1)",
           "DESCRIBE runs", "SHOW TABLES", "SHOW runs", "SUMMARIZE steps", "EXPLAIN SELECT * FROM tokens",
           "SELECT * FROM range(3)", "SELECT * FROM run_summary r JOIN runs USING (run_id)",
           "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 3) SELECT * FROM t",
           "SELECT unnest([1, 2])", "SELECT * FROM technique_comparison"]


def test_the_table_is_large_enough():
    assert len(HOSTILE) >= 70 and len({sql for sql, _ in HOSTILE}) == len(HOSTILE)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = tmp_path_factory.mktemp("console") / "runs.duckdb"
    with Store(path) as store:
        store.con.execute("INSERT INTO runs (run_id, status) VALUES ('r1', 'done')")
        store.con.execute("INSERT INTO steps (run_id, step) VALUES ('r1', 0)")
    return path


@pytest.fixture(scope="module")
def reader(path):
    with Reader(path) as reader:
        yield reader


@pytest.mark.parametrize("sql, message", HOSTILE)
def test_hostile_input_is_refused_by_a_reader(reader, sql, message):
    with pytest.raises(StoreError, match="refused|not valid") as err:
        reader.query(sql)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert reader.query("SELECT count(*) AS n FROM runs").to_pylist() == [{"n": 1}]


@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    with StoreThread(tmp_path_factory.mktemp("writer") / "runs.duckdb") as recorder:
        recorder._store.con.execute("INSERT INTO runs (run_id, status) VALUES ('r1', 'done')")
        recorder._store.con.execute("INSERT INTO steps (run_id, step) VALUES ('r1', 0)")
        yield recorder


@pytest.mark.parametrize("sql, message", HOSTILE)
def test_hostile_input_is_refused_through_the_writer(recorder, sql, message):
    """The app's path: the check holds there too, so nothing runs before a rollback."""
    with pytest.raises(StoreError, match="refused|not valid") as err:
        recorder.query(sql)
    assert message in str(err.value)
    assert recorder.query("SELECT count(*) AS n FROM runs").to_pylist() == [{"n": 1}]
    assert recorder.query("SELECT count(*) AS n FROM run_summary").to_pylist() == [{"n": 1}]


@pytest.mark.parametrize("sql", ALLOWED)
def test_queries_still_run(reader, recorder, sql):
    assert reader.query(sql).num_rows > 0 and recorder.query(sql).num_rows > 0


@pytest.mark.parametrize("sql", ["DELETE FROM runs", "UPDATE runs SET status = 'x'", "DROP TABLE steps",
                                 "WITH x AS (DELETE FROM runs RETURNING *) SELECT count(*) FROM x"])
def test_a_writer_query_cannot_write_even_if_the_check_misses_it(tmp_path, monkeypatch, sql):
    from workbench.store import console

    monkeypatch.setattr(console, "check_query", lambda con, sql: None)  # pretend the first line of defence failed
    with Store(tmp_path / "runs.duckdb") as store:
        store.con.execute("INSERT INTO runs (run_id, status) VALUES ('x', 'done')")
        with pytest.raises(StoreError, match="read-only"):
            store.query(sql)
        assert store.con.execute("SELECT count(*), any_value(status) FROM runs").fetchall() == [(1, "done")]
        assert store.con.execute("SELECT count(*) FROM steps").fetchall() == [(0,)]


SLOW = "SELECT sum(i) FROM range(1000000000000) t(i)"


def test_a_query_stops_at_its_time_limit(reader):
    t0 = time.perf_counter()
    with pytest.raises(StoreError, match=r"time limit of 0.3 s"):
        reader.query(SLOW, limits=Limits(timeout_s=0.3))
    assert time.perf_counter() - t0 < 5
    assert reader.query("SELECT count(*) AS n FROM runs").to_pylist() == [{"n": 1}]  # the reader still works


def test_a_result_is_cut_at_the_row_limit_and_says_so(reader):
    table = reader.query("SELECT * FROM range(1000000000)", limits=Limits(max_rows=100))
    assert table.num_rows == 100 and "row limit" in row_limit_note(table)
    assert row_limit_note(reader.query("SELECT * FROM range(100)", limits=Limits(max_rows=100))) is None


def test_a_query_stops_at_the_memory_limit(tmp_path):
    Store(tmp_path / "runs.duckdb").close()
    with Reader(tmp_path / "runs.duckdb", Limits(memory_mib=32)) as small:
        with pytest.raises(StoreError, match="memory limit of 32 MiB"):  # DuckDB's working memory
            small.query("SELECT count(*) FROM (SELECT i, repeat('x', 100) AS s FROM range(3000000) t(i) "
                        "ORDER BY random())")
        with pytest.raises(StoreError, match="result passed the memory limit of 32 MiB"):  # the result held
            small.query("SELECT repeat('x', 10000) AS s FROM range(9000)")  # past 32 MiB in the second batch


def test_a_time_limit_that_lands_while_the_result_streams_says_so(tmp_path):
    # DuckDB's interrupt then surfaces through pyarrow's batch reader (an OSError), not as its own exception
    Store(tmp_path / "runs.duckdb").close()
    with Reader(tmp_path / "runs.duckdb", Limits(timeout_s=0.3, max_rows=10**9, memory_mib=1 << 16)) as reader:
        with pytest.raises(StoreError, match="ran past the time limit of 0.3 s"):
            reader.query("SELECT i FROM range(100000000000) t(i)")


def test_limits_out_of_range_are_refused(path):
    with pytest.raises(StoreError, match="valid: timeout >= 0"):
        Reader(path, Limits(max_rows=0))


def _in_thread(fn):
    out = {}

    def run():
        try:
            out["result"] = fn()
        except Exception as err:
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_a_slow_query_does_not_hold_up_a_write(tmp_path):
    from workbench.spec import RunSpec
    from workbench.trace import Trace

    with StoreThread(tmp_path / "runs.duckdb") as recorder:
        thread, out = _in_thread(lambda: recorder.query(SLOW, limits=Limits(timeout_s=4)))
        time.sleep(0.5)
        trace = Trace(spec=RunSpec(), prompt="hi", prompt_ids=[1, 2], model="m", dtype="float32", device="cpu")
        t0 = time.perf_counter()
        recorder.begin(trace)
        trace.status = "done"
        recorder.finish(trace)
        took = time.perf_counter() - t0
        assert thread.is_alive() and took < 2.0  # recorded while the query still ran
        thread.join()
    assert "time limit of 4 s" in str(out["error"])


def test_a_running_query_can_be_cancelled(recorder):
    cancel = Cancel()
    thread, out = _in_thread(lambda: recorder.query(SLOW, limits=Limits(timeout_s=60), cancel=cancel))
    time.sleep(0.3)
    t0 = time.perf_counter()
    cancel.cancel()
    thread.join(10)
    assert not thread.is_alive() and time.perf_counter() - t0 < 5
    assert str(out["error"]) == "query cancelled"


def test_the_console_cannot_read_the_version_table(recorder):
    with pytest.raises(StoreError, match="schema_version is not a table or view of the store"):
        recorder.query("SELECT * FROM schema_version")
