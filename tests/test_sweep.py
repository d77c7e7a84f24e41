"""Sweeps: grid expansion and cell keys, a local sweep recorded and resumed, failed cells, the schema
migration, the CLI, and the same sweep on a local Ray instance giving the same tokens."""

from __future__ import annotations

import duckdb
import pytest

from workbench.cli import main
from workbench.errors import SpecError, WorkbenchError
from workbench.store import Reader, Store
from workbench.store import writer as store_writer
from workbench.sweep import Grid, cell_key, load_grid, make_executor, run_sweep
from workbench.views.sweeps import pareto_front, sweep_pareto_figure, sweep_query

TINY = dict(model="random:llama", dtype="float32")
PROMPTS = ["5 6 7 8", "9 10 11"]


def test_axes_multiply_the_base_specs_and_keys_follow_spec_prompt_and_seed():
    grid = Grid(specs=["decode=prompt_lookup:k=2", "decode=prompt_lookup:k=2;temperature=0.5"],
                axes={"decode.k": [4, 8], "cache": ["", "h2o"]}, prompts=PROMPTS, seeds=[0, 1], **TINY)
    specs = grid.specs_expanded()
    assert len(specs) == 2 * 2 * 2
    assert {s.decode.params["k"] for s in specs} == {4, 8} and {len(s.cache) for s in specs} == {0, 1}
    assert all(s.model == "random:llama" and s.max_new_tokens == grid.max_new_tokens for s in specs)
    cells = grid.cells()
    assert len(cells) == 8 * 2 * 2 and len({c.key for c in cells}) == len(cells)
    first = cells[0]
    assert first.key == cell_key(first.spec, first.prompt, first.seed)
    assert cell_key(first.spec, first.prompt, 1) != first.key and cell_key(first.spec, "other", 0) != first.key
    assert Grid(**{**vars(grid), "name": "renamed"}).sweep_id() == grid.sweep_id()
    with pytest.raises(SpecError, match="exactly one cache technique"):
        Grid(axes={"cache.budget": [8]}, prompts=PROMPTS, **TINY).cells()
    with pytest.raises(SpecError, match="bad axis"):
        Grid(axes={"temperature.k": [8]}, prompts=PROMPTS, **TINY).cells()
    with pytest.raises(WorkbenchError, match="no prompts"):
        Grid(**TINY).cells()


def test_a_grid_file_in_toml_or_yaml(tmp_path):
    (tmp_path / "prompts.txt").write_text("5 6 7\n\n8 9\n")
    (tmp_path / "g.toml").write_text('specs = ["", "decode=prompt_lookup:k=4"]\nseeds = [0, 1]\n'
                                     'model = "random:llama"\n[axes]\ntemperature = [0, 0.5]\n'
                                     '[prompts]\nfile = "prompts.txt"\n')
    (tmp_path / "g.yaml").write_text("specs: ['', 'decode=prompt_lookup:k=4']\nseeds: [0, 1]\nmodel: random:llama\n"
                                     "axes: {temperature: [0, 0.5]}\nprompts: {file: prompts.txt}\n")
    toml, yaml = load_grid(tmp_path / "g.toml"), load_grid(tmp_path / "g.yaml")
    assert toml.prompts == ["5 6 7", "8 9"] and len(toml.cells()) == 2 * 2 * 2 * 2
    assert [c.key for c in toml.cells()] == [c.key for c in yaml.cells()]
    (tmp_path / "bad.toml").write_text("spec = ['']\n")
    with pytest.raises(WorkbenchError, match="unknown keys.*spec"):
        load_grid(tmp_path / "bad.toml")


def test_a_local_sweep_records_its_cells_resumes_and_goes_on_after_a_failed_cell(tmp_path):
    # "hello" is not token ids, which the tokenizer-less random model needs: that cell fails, the rest run
    grid = Grid(specs=["", "decode=prompt_lookup:k=4"], prompts=[*PROMPTS, "hello"], max_new_tokens=5, **TINY)
    with Store(tmp_path / "runs.duckdb") as store:
        report = run_sweep(grid, make_executor(grid), store, progress=False)
        assert (report.cells, report.skipped, report.done, report.failed) == (6, 0, 4, 2)
        assert "space-separated token ids" in report.errors[0]
        again = run_sweep(grid, make_executor(grid), store, progress=False)
        assert (again.skipped, again.done, again.failed) == (4, 0, 2)  # failed cells are tried again
        rows = store.query(sweep_query(report.sweep_id)).to_pylist()
        with pytest.raises(WorkbenchError, match="bad sweep id"):
            sweep_query("x' OR 1=1")
    figure = sweep_pareto_figure(rows)
    points = [t for t in figure.data if t.mode == "markers"]
    assert len(rows) == 4 and len(points) == 2
    assert sorted(len(p.customdata[0][0].split(",")) for p in points) == [2, 2]  # each point opens its 2 runs
    with Reader(tmp_path / "runs.duckdb") as reader:
        summary = reader.query("SELECT spec, cells, done, failed, n_new_tokens FROM sweep_summary ORDER BY spec"
                               ).to_pylist()
        runs = reader.query("SELECT count(*) AS n FROM runs r JOIN sweep_cells c USING (run_id)").to_pylist()
    assert [(r["cells"], r["done"], r["failed"], r["n_new_tokens"]) for r in summary] == [(3, 2, 1, 5.0)] * 2
    assert runs == [{"n": 4}]  # the failed cells never began a run


def test_the_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    points = [(10.0, 5.0), (20.0, 8.0), (15.0, 9.0), (5.0, 1.0), (20.0, 9.0)]  # (tok/s, bytes)
    assert pareto_front(points, lower_y_better=True) == [3, 0, 1]
    assert pareto_front(points, lower_y_better=False) == [4]


def test_a_version_6_store_gains_the_sweep_tables(tmp_path):
    path = tmp_path / "runs.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP)")
    for version in range(1, 7):
        for statement in store_writer.MIGRATIONS[version]:
            con.execute(statement)
        con.execute("INSERT INTO schema_version VALUES (?, now())", [version])
    con.close()
    with Store(path) as store:
        tables = {r[0] for r in store.con.execute("SHOW TABLES").fetchall()}
        assert {"sweeps", "sweep_cells", "sweep_summary"} <= tables
        version = store.con.execute("SELECT max(version) FROM schema_version").fetchall()
        assert version == [(store_writer.SCHEMA_VERSION,)]


def test_the_sweep_command(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    args = ["sweep", "--model", "random:llama", "--dtype", "float32", "--spec", "",
            "--axis", "decode=plain|prompt_lookup:k=4", "--prompts", str(tmp_path / "p.txt"),
            "--max-new-tokens", "4", "--seeds", "0,1", "--store",
            str(tmp_path / "runs.duckdb"), "--no-progress"]
    assert main(args) == 0
    assert "8 cells, 0 already stored and skipped, 8 done, 0 failed, locally" in capsys.readouterr().out
    assert main(args) == 0
    assert "8 already stored and skipped, 0 done" in capsys.readouterr().out
    assert main([*args[:-1], "--axis", "decode.k"]) == 2
    assert "bad --axis 'decode.k'" in capsys.readouterr().err


def test_the_same_sweep_on_local_ray_gives_the_same_tokens(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is the sweep extra (make setup installs it)")
    grid = Grid(specs=["", "decode=prompt_lookup:k=4", "temperature=0.8"], prompts=PROMPTS, seeds=[0, 1],
                max_new_tokens=6, **TINY)
    local = run_sweep(grid, make_executor(grid), progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with Store(tmp_path / "runs.duckdb") as store:
            remote = run_sweep(grid, make_executor(grid, ray=True, workers=2), store, progress=False)
            workers = store.con.execute("SELECT DISTINCT worker FROM sweep_cells ORDER BY 1").fetchall()
    finally:
        ray.shutdown()
    assert (remote.done, remote.workers, len(remote.load_s)) == (12, 2, 2)
    assert remote.token_ids == local.token_ids and len(local.token_ids) == 12
    assert workers == [("ray-0",), ("ray-1",)]


def test_the_long_context_suite_as_a_prompt_source(tmp_path, capsys):
    from workbench.eval.long_context import long_context_suite

    (tmp_path / "g.toml").write_text('model = "random:llama"\n[prompts]\n'
                                     'long_context = { lengths = [300], tasks = ["passkey", "kv"], seed = 1 }\n')
    grid = load_grid(tmp_path / "g.toml")
    expected = long_context_suite(lambda text: len(text.encode()), [300], ("passkey", "kv"), 1, 1)
    assert grid.prompts == [item.prompt for item in expected] and len(grid.prompts) == 2
    assert all(len(p.encode()) <= 300 for p in grid.prompts)  # a model without a tokenizer counts bytes
    (tmp_path / "bad.toml").write_text('[prompts]\nlong_context = { lengths = [300], tasks = ["riddles"] }\n')
    with pytest.raises(WorkbenchError, match="unknown long-context tasks.*valid: passkey, kv, summarization"):
        load_grid(tmp_path / "bad.toml")
    base = ["sweep", "--model", "random:llama", "--no-store", "--no-progress"]
    assert main([*base, "--long-context-tasks", "kv"]) == 2
    assert "--long-context-tasks needs --long-context" in capsys.readouterr().err
    assert main([*base, "--long-context", "2k"]) == 2
    assert "bad long-context lengths" in capsys.readouterr().err
