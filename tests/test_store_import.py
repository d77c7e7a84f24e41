"""Import checks the whole export before it writes: ids, JSON, statuses, invariants, orphans and schema."""

import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from workbench import Workbench
from workbench.cli import main
from workbench.errors import StoreError
from workbench.store import Reader, Store, export_parquet, import_parquet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An export of two runs: plain, and prompt lookup (with draft nodes)."""
    root = tmp_path_factory.mktemp("export")
    wb = Workbench("random:llama", dtype="float32")
    with Store(root / "runs.duckdb") as store:
        wb.store = store
        wb.generate("5 6 7 8 5 6 7 8 5 6 7 8 5 6", "max_new_tokens=12")
        wb.generate("5 6 7 8 5 6 7 8 5 6 7 8 5 6", "max_new_tokens=12;decode=prompt_lookup:k=4")
    with Reader(root / "runs.duckdb") as reader:
        export_parquet(reader, root / "out")
    return root / "out"


def _edit(folder, name, change):
    path = folder / f"{name}.parquet"
    table = pq.read_table(path)
    metadata = table.schema.metadata
    table = change(table)
    pq.write_table(table.replace_schema_metadata(metadata), path)


def _set(column, row, value, type_=None):
    def change(table):
        values = table.column(column).to_pylist()
        values[row] = value
        index = table.schema.get_field_index(column)
        return table.set_column(index, column, pa.array(values, type_ or table.schema.field(column).type))
    return change


def _duplicate_first_run(table):
    return pa.concat_tables([table, table.slice(0, 1)])


def _bump_step(table):
    return _set("step", 1, 7)(table)


def _orphan(table):
    return pa.concat_tables([table, _set("run_id", 0, "ghost")(table.slice(0, 1))])


def _reject_an_accepted_parent(table):
    accepted = table.column("accepted").to_pylist()
    parents = table.column("parent").to_pylist()
    row = next(i for i, (a, p) in enumerate(zip(accepted, parents)) if a and p >= 0)
    parent_row = next(i for i, node in enumerate(table.column("node").to_pylist())
                      if node == parents[row] and table.column("step")[i] == table.column("step")[row])
    return _set("accepted", parent_row, False)(table)


def _retype(column, type_):
    def change(table):
        index = table.schema.get_field_index(column)
        return table.set_column(index, column, pc.cast(table.column(column), type_))
    return change


CASES = [
    ("runs", _duplicate_first_run, "rows 0 and 2, column run_id"),
    ("runs", _set("spec_json", 1, "{not json"), "row 1 (run"),
    ("runs", _set("spec_json", 0, "[1, 2]"), "column spec_json: a JSON list"),
    ("runs", _set("status", 0, "pwned"), "column status: 'pwned' is not a status"),
    ("runs", _set("run_id", 1, None), "row 1, column run_id: None"),
    ("runs", _set("run_id", 0, ""), "row 0, column run_id: ''"),
    ("runs", _retype("run_id", pa.large_string()), "column run_id has type large_string"),
    ("runs", _set("n_new_tokens", 0, 13), "column n_new_tokens: 13, but its steps generate 12"),
    ("runs", _set("target_forwards", 0, 99), "column target_forwards: 99"),
    ("runs", _set("mean_accepted_length", 1, 5.0), "column mean_accepted_length"),
    ("runs", _retype("n_new_tokens", pa.string()), "column n_new_tokens has type string; the store's is int32"),
    ("runs", lambda t: t.drop_columns(["status"]), "column status is missing"),
    ("runs", lambda t: t.append_column("pwned", pa.array([1] * t.num_rows)), "unknown column pwned"),
    ("steps", _bump_step, "column step"),
    ("steps", _orphan, "'ghost' is not a run of runs.parquet (an orphan row)"),
    ("steps", _set("run_id", 0, None), "row 0, column run_id: None"),
    ("tokens", _set("position", 3, 1000), "column position"),
    ("tokens", _orphan, "orphan row"),
    ("draft_nodes", _reject_an_accepted_parent, "is accepted but its parent"),
    ("cache_stats", _orphan, "orphan row"),
]


@pytest.mark.parametrize("name, change, message", CASES)
def test_a_bad_export_is_refused_whole_naming_the_row_and_column(export, tmp_path, name, change, message):
    folder = tmp_path / "bad"
    shutil.copytree(export, folder)
    _edit(folder, name, change)
    with Store(tmp_path / "runs.duckdb") as store:
        with pytest.raises(StoreError) as err:
            import_parquet(store, folder)
        assert message in str(err.value) and f"{name}.parquet" in str(err.value) and "\n" not in str(err.value)
        assert store.con.execute("SELECT (SELECT count(*) FROM runs) + (SELECT count(*) FROM steps)").fetchall() \
            == [(0,)]  # nothing imported
        assert import_parquet(store, export)["runs"] == 2  # the good export still imports


def _integer_ids(table):
    return table.set_column(0, "run_id", pa.array(range(table.num_rows), pa.int64()))


@pytest.mark.parametrize("change", [_set("run_id", 0, None), _integer_ids])
def test_a_null_or_integer_run_id_is_a_one_line_error_from_the_cli(export, tmp_path, capsys, change):
    folder = tmp_path / "bad"
    shutil.copytree(export, folder)
    _edit(folder, "runs", change)
    code = main(["import", str(folder), "--store", str(tmp_path / "runs.duckdb")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "column run_id" in err


def test_export_onto_a_file_is_a_one_line_error(export, tmp_path, capsys):
    store = tmp_path / "runs.duckdb"
    with Store(store) as s:
        import_parquet(s, export)
    target = tmp_path / "taken.parquet"
    target.write_bytes(b"keep me")
    code = main(["export", "--parquet", str(target), "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and "is not a folder" in err and err.count("\n") == 1 and target.read_bytes() == b"keep me"
