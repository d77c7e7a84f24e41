"""The store under attack: failed writes, odd store paths, escapes in printed text, migrations, new columns."""

import json
import os
import stat
import subprocess
import sys

import duckdb
import pytest

from workbench import Workbench
from workbench.cli import main
from workbench.errors import StoreError
from workbench.store import Reader, Store, writer
from workbench.store.commands import printable

pytestmark = pytest.mark.usefixtures("one_thread")

RANDOM = ["--model", "random:llama", "--dtype", "float32"]
ENOSPC = 'IO Error: Could not write file "{path}.wal": No space left on device'


@pytest.fixture(scope="module")
def wb():
    return Workbench("random:llama", dtype="float32")


class FailingConnection:
    """A fault injection seam: the writer's connection, raising an IOException on statements matching `when`."""

    def __init__(self, con, when, message):
        self._con, self._when, self._message = con, when, message

    def execute(self, sql, *args):
        if self._when(sql):
            raise duckdb.IOException(self._message)
        return self._con.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._con, name)


def test_a_failed_write_is_reported_in_one_line_and_the_run_kept_as_failed(tmp_path, wb):
    path = tmp_path / "runs.duckdb"
    with Store(path) as store:
        real = store.con
        store.con = FailingConnection(real, lambda sql: sql == "COMMIT", ENOSPC.format(path=path))
        wb.store = store
        try:
            with pytest.raises(StoreError) as err:
                wb.generate("5 6 7 8", "max_new_tokens=6")
        finally:
            wb.store = None
            store.con = real
    message = str(err.value)
    assert f"no space left on device writing {path}.wal" in message and "\n" not in message
    assert "kept as failed" in message and "rollback" not in message.lower()
    with Reader(path) as reader:
        (run,) = reader.query("SELECT status, error, n_new_tokens, text FROM runs").to_pylist()
        steps = reader.query("SELECT count(*) AS n FROM steps").to_pylist()
    assert run["status"] == "failed" and "no space left on device" in run["error"]
    assert run["n_new_tokens"] == 6 and run["text"]  # what could be kept: its row, metrics and text
    assert steps == [{"n": 0}]


def test_when_even_the_failed_mark_cannot_be_written_the_message_says_so(tmp_path, wb):
    path = tmp_path / "runs.duckdb"
    with Store(path) as store:
        real = store.con
        store.con = FailingConnection(real, lambda sql: sql == "COMMIT" or sql.startswith("UPDATE runs"),
                                      ENOSPC.format(path=path))
        wb.store = store
        try:
            with pytest.raises(StoreError, match="marking it failed did not work either"):
                wb.generate("5 6 7 8", "max_new_tokens=3")
        finally:
            wb.store = None
            store.con = real


def test_a_failed_begin_is_a_store_error(tmp_path, wb):
    with Store(tmp_path / "runs.duckdb") as store:
        real = store.con
        store.con = FailingConnection(real, lambda sql: sql.startswith("INSERT"), "IO Error: Could not write file "
                                      '"/x/runs.duckdb.wal": Read-only file system')
        wb.store = store
        try:
            with pytest.raises(StoreError, match="read-only file system writing /x/runs.duckdb.wal"):
                wb.generate("5 6 7 8", "max_new_tokens=3")
        finally:
            wb.store = None
            store.con = real


def test_an_empty_file_is_a_store_with_no_runs_for_every_command(tmp_path, capsys):
    path = tmp_path / "runs.duckdb"
    for command in (["runs"], ["sql", "SELECT 1"], ["export", "--parquet", str(tmp_path / "out")]):
        path.write_bytes(b"")
        code = main([*command, "--store", str(path)])
        err = capsys.readouterr().err
        assert code == 2 and "no run has been recorded there yet" in err, command
    path.write_bytes(b"")
    assert main(["generate", "5 6 7", *RANDOM, "--max-new-tokens", "2", "--store", str(path)]) == 0
    capsys.readouterr()
    assert main(["runs", "--store", str(path), "--json"]) == 0 and len(json.loads(capsys.readouterr().out)) == 1
    empty = tmp_path / "empty.duckdb"
    empty.write_bytes(b"")
    Store(empty).close()  # the import path's writer too
    assert empty.stat().st_size > 0


@pytest.mark.parametrize("command", [["runs"], ["sql", "SELECT 1"], ["import", "DIR"],
                                     ["generate", "5 6 7", *RANDOM, "--max-new-tokens", "2"]])
def test_a_fifo_as_the_store_is_refused_not_waited_on(tmp_path, command):
    fifo = tmp_path / "runs.duckdb"
    os.mkfifo(fifo)
    command = [str(tmp_path) if c == "DIR" else c for c in command]
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", *command, "--store", str(fifo)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is a FIFO (named pipe), not a regular file" in proc.stderr
    assert proc.stderr.count("\n") == 1 and stat.S_ISFIFO(fifo.stat().st_mode)


def test_control_characters_in_stored_text_are_escaped_when_printed(tmp_path, capsys):
    path = tmp_path / "runs.duckdb"
    evil = "x\x1b]0;pwned\x07\x1b[2J\x9b31m\u202e"
    with Store(path) as store:
        store.con.execute("INSERT INTO runs (run_id, status, spec, model, text) VALUES ('r1', 'done', ?, ?, ?)",
                          [evil, evil, f"line one\nline {evil}"])
    for command in (["runs"], ["runs", "r1"], ["sql", "SELECT spec, model, text FROM runs"],
                    ["sql", "SELECT spec FROM runs", "--csv"], ["sql", "SELECT spec FROM runs", "--json"]):
        assert main([*command, "--store", str(path)]) == 0
        out = capsys.readouterr().out
        assert not any(c in out for c in "\x1b\x07\x9b\u202e"), command
    assert printable(evil) == "x\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202e"


def test_a_writer_never_rewrites_a_file_that_fails_its_checks(tmp_path):
    path = tmp_path / "runs.duckdb"
    con = duckdb.connect(str(path))  # a newer store, its last change still in the WAL
    con.execute("PRAGMA disable_checkpoint_on_shutdown")
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP)")
    con.execute("INSERT INTO schema_version VALUES (?, NULL)", [writer.SCHEMA_VERSION + 1])
    con.close()
    files = sorted(tmp_path.iterdir())
    before = {f.name: f.read_bytes() for f in files}
    assert any(f.name.endswith(".wal") for f in files)
    with pytest.raises(StoreError, match="newer than this workbench"):
        Store(path)
    assert {f.name: f.read_bytes() for f in sorted(tmp_path.iterdir())} == before


_HOLD = """
import sys, time
from workbench.store import Store
store = Store(sys.argv[1])
print("holding", flush=True)
time.sleep(60)
"""
_SECOND = """
import sys, time
from workbench.cli import main
t0 = time.perf_counter()
code = main(["generate", "hi", "--store", sys.argv[1]])
print(code, "torch" in sys.modules, round(time.perf_counter() - t0, 2))
"""


def test_a_second_writer_is_refused_before_the_model_code_loads(tmp_path):
    path = tmp_path / "runs.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        proc = subprocess.run([sys.executable, "-c", _SECOND, str(path)], capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    code, torch_loaded, _ = proc.stdout.split()
    assert code == "2" and "in use by another process" in proc.stderr
    assert torch_loaded == "False"  # refused before torch and the model were imported


def test_a_version_3_store_migrates_and_gains_the_new_columns(tmp_path, wb):
    path = tmp_path / "runs.duckdb"
    con = duckdb.connect(str(path))  # a store as version 3 of the workbench left it
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP)")
    for version in (1, 2, 3):
        for statement in writer.MIGRATIONS[version]:
            con.execute(statement)
        con.execute("INSERT INTO schema_version VALUES (?, now())", [version])
    con.execute("INSERT INTO runs (run_id, status, n_new_tokens) VALUES ('old', 'done', 3)")
    con.close()
    with Reader(path) as reader:  # a reader migrates it (through a writer, once) and reads on
        rows = reader.query("SELECT run_id, simulated, warm_start, cache_live_bytes, peak_cache_live_bytes, "
                            "provenance, commit, backend, warnings FROM run_summary").to_pylist()
    assert rows == [{"run_id": "old", "simulated": None, "warm_start": None, "cache_live_bytes": None,
                     "peak_cache_live_bytes": None, "provenance": None, "commit": None, "backend": None,
                     "warnings": None}]
    with Store(path) as store:
        assert store.con.execute("SELECT max(version) FROM schema_version").fetchall() == [(writer.SCHEMA_VERSION,)]
        assert "cache_live_bytes" in [r[0] for r in store.con.execute("DESCRIBE steps").fetchall()]


def test_new_summary_fields_are_stored_and_grouped(tmp_path, wb, monkeypatch):
    from workbench import trace as trace_module

    provenance = {"commit": "abc123", "dirty": False, "backends": {"matmul": "torch", "attention": "c"}}
    real = trace_module.Trace.summary
    extra = {"simulated": ["fp4"], "warm_start": True, "cache_live_bytes": 100, "peak_cache_live_bytes": 200,
             "provenance": provenance}
    monkeypatch.setattr(trace_module.Trace, "summary", lambda self: {**real(self), **extra})
    with Store(tmp_path / "runs.duckdb") as store:
        wb.store = store
        try:
            wb.generate("5 6 7 8", "max_new_tokens=3")
            wb.generate("5 6 7 8", "max_new_tokens=4")
        finally:
            wb.store = None
        rows = store.query("SELECT commit, backend, count(*) AS n, any_value(simulated) AS simulated, "
                           "bool_and(warm_start) AS warm, max(peak_cache_live_bytes) AS peak FROM run_summary "
                           "GROUP BY commit, backend").to_pylist()
    assert rows == [{"commit": "abc123", "backend": "attention=c,matmul=torch", "n": 2, "simulated": ["fp4"],
                     "warm": True, "peak": 200}]


def test_step_cache_live_bytes_come_from_the_step_events(tmp_path, wb, monkeypatch):
    from workbench.store import writer as writer_module

    real = writer_module.detail_tables

    def with_live_bytes(trace):
        for e in trace.events:
            object.__setattr__(e, "cache_live_bytes", 1000 + e.step)
        return real(trace)

    monkeypatch.setattr(writer_module, "detail_tables", with_live_bytes)
    with Store(tmp_path / "runs.duckdb") as store:
        wb.store = store
        try:
            wb.generate("5 6 7 8", "max_new_tokens=3")
        finally:
            wb.store = None
        assert store.con.execute("SELECT list(cache_live_bytes ORDER BY step) FROM steps").fetchall() == \
            [([1000, 1001, 1002],)]


class RecordingConnection(FailingConnection):
    def __init__(self, con):
        super().__init__(con, lambda sql: False, "")
        self.statements = []

    def execute(self, sql, *args):
        self.statements.append(sql)
        return super().execute(sql, *args)


def test_finishing_a_begun_run_does_not_scan_the_detail_tables(tmp_path, wb):
    """A begun run has no details yet, so finishing it deletes nothing: its cost does not grow with the store."""
    with Store(tmp_path / "runs.duckdb") as store:
        real = store.con
        store.con = RecordingConnection(real)
        wb.store = store
        try:
            trace = wb.generate("5 6 7 8", "max_new_tokens=4")
            assert not [s for s in store.con.statements if s.startswith("DELETE")]
            store.finish(trace)  # finishing it again replaces its details
            assert len([s for s in store.con.statements if s.startswith("DELETE")]) == 4
        finally:
            wb.store = None
            store.con = real
        assert store.con.execute("SELECT count(*) FROM steps").fetchall() == [(4,)]
