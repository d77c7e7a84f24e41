"""The store's commands: recording by default, runs, sql (and its refusals), export and import."""

import csv
import io
import json

import pytest

from workbench.cli import main
from workbench.store import default_store_path

from .test_store_console import HOSTILE

pytestmark = pytest.mark.usefixtures("one_thread")

RANDOM = ["--model", "random:llama", "--dtype", "float32"]


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def store_path(tmp_path, monkeypatch):
    path = tmp_path / "runs.duckdb"
    monkeypatch.setenv("WORKBENCH_STORE", str(path))
    return path


@pytest.fixture
def recorded(capsys, store_path):
    for max_new in ("3", "5"):
        code, _, _ = run_cli(capsys, "generate", "5 6 7 8", *RANDOM, "--max-new-tokens", max_new)
        assert code == 0
    return store_path


def test_default_location_follows_xdg_data_home(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBENCH_STORE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_store_path() == tmp_path / "workbench" / "runs.duckdb"
    monkeypatch.setenv("WORKBENCH_STORE", str(tmp_path / "x.duckdb"))
    assert default_store_path() == tmp_path / "x.duckdb"


def test_generate_records_by_default_and_not_with_no_store(capsys, store_path, tmp_path):
    code, out, _ = run_cli(capsys, "generate", "5 6 7 8", *RANDOM, "--max-new-tokens", "3", "--json")
    run_id = json.loads(out)["run_id"]
    assert code == 0 and store_path.exists()
    code, _, _ = run_cli(capsys, "generate", "5 6 7 8", *RANDOM, "--max-new-tokens", "3", "--no-store")
    other = tmp_path / "other.duckdb"
    code, _, err = run_cli(capsys, "generate", "5 6 7 8", *RANDOM, "--max-new-tokens", "3", "--store", str(other))
    assert code == 0 and f"in {other}" in err
    code, out, _ = run_cli(capsys, "runs", "--json")
    assert [r["run_id"] for r in json.loads(out)] == [run_id]  # --no-store and --store left it alone


def test_runs_lists_newest_first_and_shows_one(capsys, recorded):
    code, out, _ = run_cli(capsys, "runs", "--json")
    runs = json.loads(out)
    assert code == 0 and [r["n_new_tokens"] for r in runs] == [5, 3]
    code, out, _ = run_cli(capsys, "runs", "--limit", "1")
    assert code == 0 and "(1 row)" in out and runs[0]["run_id"] in out
    code, out, _ = run_cli(capsys, "runs", runs[1]["run_id"][:8])
    assert code == 0 and "n_new_tokens  3" in out and "mean_accepted_length" in out
    code, _, err = run_cli(capsys, "runs", "nosuchrun")
    assert code == 2 and "no run" in err


def test_sql_prints_a_table_json_or_csv(capsys, recorded):
    query = "SELECT n_new_tokens, status FROM runs ORDER BY n_new_tokens"
    code, out, _ = run_cli(capsys, "sql", query)
    assert code == 0 and out.splitlines()[0].split() == ["n_new_tokens", "status"] and "(2 rows)" in out
    _, out, _ = run_cli(capsys, "sql", query, "--json")
    assert json.loads(out) == [{"n_new_tokens": 3, "status": "done"}, {"n_new_tokens": 5, "status": "done"}]
    _, out, _ = run_cli(capsys, "sql", query, "--csv")
    assert list(csv.reader(io.StringIO(out))) == [["n_new_tokens", "status"], ["3", "done"], ["5", "done"]]


@pytest.mark.parametrize("sql, message", HOSTILE)
def test_sql_refusals_are_one_line_errors(capsys, recorded, sql, message):
    code, out, err = run_cli(capsys, "sql", sql)
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_a_foreign_store_is_a_one_line_error_and_untouched(capsys, store_path):
    store_path.write_text("not a database\n")
    code, _, err = run_cli(capsys, "generate", "5 6 7 8", *RANDOM, "--max-new-tokens", "3")
    assert code == 2 and "a text file" in err and err.count("\n") == 1
    assert store_path.read_text() == "not a database\n"


def test_export_and_import_round_trip(capsys, recorded, tmp_path):
    folder, copy = tmp_path / "export", tmp_path / "copy.duckdb"
    code, out, _ = run_cli(capsys, "export", "--parquet", str(folder))
    assert code == 0 and "exported 2 runs" in out
    code, out, _ = run_cli(capsys, "import", str(folder), "--store", str(copy))
    assert code == 0 and "imported 2 new runs" in out
    query = "SELECT run_id, step, position, token_id, source FROM tokens ORDER BY ALL"
    _, original, _ = run_cli(capsys, "sql", query, "--csv")
    _, copied, _ = run_cli(capsys, "sql", query, "--csv", "--store", str(copy))
    assert copied == original and len(original.splitlines()) == 1 + 2 * 4 + 3 + 5


def test_sql_limits_are_options_and_a_hit_limit_is_one_line(capsys, recorded):
    code, out, err = run_cli(capsys, "sql", "SELECT * FROM range(1000000000)", "--max-rows", "5", "--csv")
    assert code == 0 and len(out.splitlines()) == 6 and "row limit" in err and err.count("\n") == 1
    code, out, err = run_cli(capsys, "sql", "SELECT sum(i) FROM range(1000000000000) t(i)", "--timeout", "0.3")
    assert code == 2 and out == "" and "time limit of 0.3 s" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "sql", "SELECT 1", "--max-rows", "0")
    assert code == 2 and "valid: timeout >= 0" in err


def test_ctrl_c_during_sql_cancels_it_with_a_one_line_error(recorded):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "sql", "SELECT sum(i) FROM range(1000000000000) "
                             "t(i)", "--store", str(recorded), "--timeout", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                                                signal.SIG_DFL))
    time.sleep(4)  # started, the store opened and the query running
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and err == "error: query cancelled (Ctrl-C)\n" and out == ""
    assert time.perf_counter() - t0 < 5
