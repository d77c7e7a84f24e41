"""The DuckDB trace store: atomic runs, invariants, robustness, the sealed console, views, export/import."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading

import duckdb
import pytest

from workbench import Workbench
from workbench.errors import StoreError
from workbench.store import Reader, Store, StoreThread, export_parquet, import_parquet, writer
from workbench.store.writer import CACHE_SAMPLE_STEPS, sampled_steps

from . import helpers  # noqa: F401  (registers the failing drafter)

pytestmark = pytest.mark.usefixtures("one_thread")

REPEATING = "5 6 7 8 5 6 7 8 5 6 7 8 5 6"  # prompt lookup finds drafts here




@pytest.fixture(scope="module")
def wb():
    return Workbench("random:llama", dtype="float32")


@pytest.fixture
def store(tmp_path, wb):
    s = Store(tmp_path / "runs.duckdb")
    wb.store = s
    yield s
    wb.store = None
    s.close()


def q(store: Store, sql: str, params=None) -> list[tuple]:
    return store.con.execute(sql, params or []).fetchall()


def test_a_recorded_run_holds_every_table_and_its_summary(wb, store):
    trace = wb.generate(REPEATING, "max_new_tokens=20;decode=prompt_lookup:k=4")
    summary = trace.summary()
    (status, n_new, forwards, mal, text, n_prompt), = q(store, "SELECT status, n_new_tokens, target_forwards, "
                                                        "mean_accepted_length, text, n_prompt_tokens FROM runs")
    assert (status, n_new, forwards, text, n_prompt) == ("done", 20, summary["target_forwards"], trace.text, 14)
    assert mal == pytest.approx(summary["mean_accepted_length"]) and mal > 1
    assert q(store, "SELECT count(*) FROM tokens WHERE source = 'prompt'") == [(14,)]
    assert q(store, "SELECT count(*) FROM draft_nodes")[0][0] == summary["nodes_drafted"] > 0
    assert q(store, "SELECT list(token_id ORDER BY position) FROM tokens WHERE source != 'prompt'")[0][0] == \
        trace.token_ids


def test_invariants_hold_on_recorded_runs(wb, store):
    wb.generate(REPEATING, "max_new_tokens=19;decode=prompt_lookup:k=4")  # ends inside an accepted draft
    wb.generate("5 6 7 8", "max_new_tokens=7")
    assert q(store, "SELECT count(*) FROM steps WHERE NOT bonus_token") == [(1,)]  # the case the flag exists for
    for (run_id, n_new, forwards) in q(store, "SELECT run_id, n_new_tokens, target_forwards FROM runs"):
        steps = q(store, "SELECT step, tokens_accepted, bonus_token FROM steps WHERE run_id = ? ORDER BY step",
                  [run_id])
        assert [s[0] for s in steps] == list(range(forwards))
        assert n_new == sum(accepted + bonus for _, accepted, bonus in steps)
        assert all(bonus for _, _, bonus in steps[:-1])  # only the last step may lose its bonus token
        positions = [p for (p,) in q(store, "SELECT position FROM tokens WHERE run_id = ? ORDER BY position", [run_id])]
        assert positions == list(range(len(positions)))
        orphans = q(store, """SELECT count(*) FROM draft_nodes n LEFT JOIN draft_nodes p
            ON p.run_id = n.run_id AND p.step = n.step AND p.node = n.parent
            WHERE n.run_id = ? AND n.accepted AND n.parent >= 0 AND NOT coalesce(p.accepted, false)""", [run_id])
        assert orphans == [(0,)]


def test_a_run_is_running_until_it_finishes(wb, store):
    stream = wb.stream("5 6 7 8", "max_new_tokens=5")
    next(stream)
    assert q(store, "SELECT status FROM runs") == [("running",)]
    assert q(store, "SELECT count(*) FROM steps") == [(0,)]  # details arrive in one transaction at the end
    list(stream)
    assert q(store, "SELECT status FROM runs") == [("done",)] and q(store, "SELECT count(*) FROM steps") == [(5,)]


def test_failed_and_interrupted_runs_are_recorded_with_what_ran(wb, store):
    with pytest.raises(RuntimeError, match="drafter broke"):
        wb.generate("5 6 7 8", "max_new_tokens=10;decode=_test_breaks_at_step_3")
    stream = wb.stream("5 6 7 8", "max_new_tokens=10")
    next(stream)
    stream.close()
    rows = q(store, "SELECT status, error, (SELECT count(*) FROM steps s WHERE s.run_id = r.run_id) FROM runs r "
                    "ORDER BY created_at")
    assert rows[0][0] == "failed" and "drafter broke" in rows[0][1] and rows[0][2] == 3
    assert rows[1][0] == "interrupted" and rows[1][2] == 1


def test_cache_stats_are_sampled_to_a_bounded_number_of_steps(wb, store):
    assert sampled_steps(100)[0] == 0 and sampled_steps(100)[-1] == 99 and len(sampled_steps(100)) == 32
    wb.generate("5 6 7 8", f"max_new_tokens={CACHE_SAMPLE_STEPS + 10}")
    steps, layers = q(store, "SELECT count(DISTINCT step), count(DISTINCT layer) FROM cache_stats")[0]
    assert steps == CACHE_SAMPLE_STEPS and layers == wb.model(wb.spec()).model.config.num_layers
    assert q(store, "SELECT max(step) FROM cache_stats") == [(CACHE_SAMPLE_STEPS + 9,)]


_KILLED_WRITER = """
import sys, time
from workbench.spec import RunSpec
from workbench.store import Store
from workbench.trace import Trace
store = Store(sys.argv[1])
store.begin(Trace(spec=RunSpec(), prompt="hi", prompt_ids=[1, 2], model="m", dtype="float32", device="cpu"))
print("begun", flush=True)
time.sleep(60)
"""


def test_a_killed_writer_leaves_an_interrupted_run_and_locks_no_one_out(tmp_path):
    path = tmp_path / "runs.duckdb"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "begun"
        for opener in (Store, Reader):  # while it lives: a clear error, not a hang
            with pytest.raises(StoreError, match="in use by another process") as err:
                opener(path)
            assert str(path) in str(err.value)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with Reader(path) as reader:  # the first open after the death repairs the status, even a reader's
        assert reader.runs().column("status").to_pylist() == ["interrupted"]
    with Store(path) as store:
        assert q(store, "SELECT status, error FROM runs") == [
            ("interrupted", "the recording process ended before the run finished")]


def test_one_writer_per_file_in_a_process(tmp_path):
    with Store(tmp_path / "runs.duckdb"):
        with pytest.raises(StoreError, match="already open for writing in this process"):
            Store(tmp_path / "runs.duckdb")


def test_in_the_writers_process_queries_go_through_the_writer(tmp_path, wb):
    with StoreThread(tmp_path / "runs.duckdb") as recorder:
        with pytest.raises(StoreError, match="open for writing in this process"):
            Reader(tmp_path / "runs.duckdb")
        wb.store = recorder
        try:
            wb.generate("5 6 7 8", "max_new_tokens=3")
        finally:
            wb.store = None
        assert recorder.query("SELECT n_new_tokens FROM runs").to_pylist() == [{"n_new_tokens": 3}]
        for sql, message in (("DELETE FROM runs", "DELETE"), ("SELECT * FROM read_csv('/etc/passwd')", "read_csv"),
                             ("SELECT 1; DROP TABLE runs", "2 statements")):
            with pytest.raises(StoreError, match=message):
                recorder.query(sql)
        assert recorder.query("SELECT count(*) AS n FROM runs").to_pylist() == [{"n": 1}]


def _sqlite(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (a)")
    con.commit()
    con.close()


def _foreign_duckdb(path):
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE mine (a INTEGER)")
    con.close()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(os.urandom(4096)), "unknown binary file"),
    (lambda p: p.write_text("run_id,status\nabc,done\n"), "a text file"),
    (_sqlite, "a SQLite database"),
    (_foreign_duckdb, "not a workbench store"),
])
@pytest.mark.parametrize("opener", [Store, Reader])
def test_a_foreign_file_is_refused_and_left_untouched(tmp_path, make, message, opener):
    path = tmp_path / "runs.duckdb"
    make(path)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=message):
        opener(path)
    assert path.read_bytes() == before


def test_migrations_apply_on_open_and_newer_stores_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "runs.duckdb"
    Store(path).close()
    newer = writer.SCHEMA_VERSION + 1
    monkeypatch.setitem(writer.MIGRATIONS, newer, ["ALTER TABLE runs ADD COLUMN note VARCHAR"])
    monkeypatch.setattr(writer, "SCHEMA_VERSION", newer)
    with Store(path) as store:
        assert q(store, "SELECT max(version) FROM schema_version") == [(newer,)]
        assert "note" in [r[0] for r in q(store, "DESCRIBE runs")]
    monkeypatch.undo()
    for opener in (Store, Reader):
        with pytest.raises(StoreError, match="newer than this workbench"):
            opener(path)


def test_a_version_1_store_gains_the_lossless_column(tmp_path):
    path = tmp_path / "runs.duckdb"
    con = duckdb.connect(str(path))  # a store as version 1 of the workbench left it
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP)")
    for statement in writer.MIGRATIONS[1]:
        con.execute(statement)
    con.execute("INSERT INTO schema_version VALUES (1, now())")
    con.close()
    with Store(path) as store:
        store.begin(trace := Workbench("random:llama", dtype="float32").generate("5 6 7", "max_new_tokens=3"))
        store.finish(trace)
        assert q(store, "SELECT lossless FROM run_summary") == [(True,)]


def test_two_threads_record_complete_runs_through_one_writer_thread(tmp_path):
    wbs = [Workbench("random:llama", dtype="float32") for _ in range(2)]
    with StoreThread(tmp_path / "runs.duckdb") as recorder:
        traces, errors = [], []

        def run(wb, n):
            try:
                wb.store = recorder
                traces.append(wb.generate("5 6 7 8", f"max_new_tokens={n}"))
            except Exception as err:  # surfaced below; a thread's exception would otherwise vanish
                errors.append(err)

        threads = [threading.Thread(target=run, args=(wb, n)) for wb, n in zip(wbs, (9, 13))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    with Reader(tmp_path / "runs.duckdb") as reader:
        rows = reader.query("SELECT r.run_id, r.status, r.n_new_tokens, count(s.step) AS steps FROM runs r "
                            "JOIN steps s USING (run_id) GROUP BY ALL ORDER BY n_new_tokens").to_pylist()
    assert [(r["status"], r["n_new_tokens"], r["steps"]) for r in rows] == [("done", 9, 9), ("done", 13, 13)]


@pytest.fixture
def recorded(tmp_path, wb):
    """A store with a plain run and a prompt-lookup run on the same prompt, closed for readers."""
    path = tmp_path / "runs.duckdb"
    with Store(path) as s:
        wb.store = s
        try:
            wb.generate(REPEATING, "max_new_tokens=16")
            wb.generate(REPEATING, "max_new_tokens=16;decode=prompt_lookup:k=4")
        finally:
            wb.store = None
    return path


def test_the_connection_itself_is_sealed(recorded):
    """The second line of defence: even unvetted SQL cannot read files or change settings."""
    with Reader(recorded) as reader:
        with pytest.raises(duckdb.PermissionException):
            reader.con.execute("SELECT * FROM read_csv('/etc/passwd')")
        with pytest.raises(duckdb.Error, match="locked"):
            reader.con.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.Error, match="read-only"):
            reader.con.execute("DELETE FROM runs")


def test_views_compare_techniques_with_plain_decoding_of_the_same_prompt(recorded):
    with Reader(recorded) as reader:
        summary = reader.query("SELECT decode, cache, compress FROM run_summary ORDER BY decode").to_pylist()
        rows = {r["decode"]: r for r in reader.query("SELECT * FROM technique_comparison").to_pylist()}
    assert summary == [{"decode": "plain", "cache": "", "compress": ""},
                       {"decode": "prompt_lookup:k=4", "cache": "", "compress": ""}]
    assert rows["plain"]["speedup"] == pytest.approx(1.0)
    lookup = rows["prompt_lookup:k=4"]
    assert lookup["baseline_runs"] == 1 and lookup["accepted_length_ratio"] > 1
    assert lookup["speedup"] == pytest.approx(lookup["tok_per_s"] / rows["plain"]["tok_per_s"])


def test_export_and_import_round_trip(recorded, tmp_path):
    out, copy = tmp_path / "export", tmp_path / "copy.duckdb"
    tables = ("runs", "steps", "tokens", "draft_nodes", "cache_stats")
    with Reader(recorded) as reader:
        counts = export_parquet(reader, out)
        original = {t: reader.query(f"SELECT * FROM {t} ORDER BY ALL").to_pylist() for t in tables}
    assert counts["runs"] == 2 and counts["draft_nodes"] > 0
    with Store(copy) as store:
        assert import_parquet(store, out) == counts
        assert import_parquet(store, out)["runs"] == 0  # known runs are skipped
    with Reader(copy) as reader:
        assert {t: reader.query(f"SELECT * FROM {t} ORDER BY ALL").to_pylist() for t in tables} == original


def test_import_refuses_a_folder_that_is_not_an_export(tmp_path):
    with Store(tmp_path / "runs.duckdb") as store, pytest.raises(StoreError, match="not a store export"):
        import_parquet(store, tmp_path)
