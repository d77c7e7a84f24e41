"""KV-cache stats for the views: shapes, values, sampled and bounded kept positions, and how the store keeps
them (schema v3: kept positions and the simulated flag per layer and head, bounded per run)."""

import duckdb
import pytest

from workbench import Workbench
from workbench.cache import stats as cache_stats_module
from workbench.cache.stats import KEPT_EVERY
from workbench.engine import Engine
from workbench.spec import RunSpec, TechniqueSpec
from workbench.store import Store, writer

from .helpers import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = list(range(10, 40))


@pytest.fixture(scope="module")
def model():
    return varied_model("llama")


def run(model, cache, n=KEPT_EVERY + 4):
    return list(Engine(model, RunSpec(max_new_tokens=n, cache=cache)).run(PROMPT))


def test_dense_stats_have_the_layer_by_head_shape_and_full_values(model):
    events = run(model, [])
    layers, heads = model.config.num_layers, model.config.num_kv_heads
    for e in events:
        s = e.cache_stats
        context = e.positions[-1]  # every committed token but the pending last one
        assert len(s.tokens) == len(s.bytes) == len(s.bits) == len(s.sparsity) == layers
        assert all(len(row) == heads for row in (*s.tokens, *s.bytes, *s.bits, *s.sparsity))
        assert s.tokens[0] == [context] * heads and s.bits[0] == [32.0] * heads and s.sparsity[0] == [0.0] * heads
        assert sum(map(sum, s.bytes)) == e.cache_live_bytes and not s.simulated
    sampled = [e.step for e in events if e.cache_stats.kept is not None]
    assert sampled == [0, KEPT_EVERY, events[-1].step]
    assert events[-1].cache_stats.kept[1][0] == list(range(events[-1].positions[-1]))


def test_eviction_and_pruning_show_as_sparsity_and_fewer_bits(model):
    e = run(model, [TechniqueSpec("streaming", {"fraction": 0.5, "sinks": 2})])[-1]
    context = e.positions[-1]
    held = e.cache_stats.tokens[0][0]
    assert held < context and e.cache_stats.sparsity[0][0] == pytest.approx(1 - held / context)
    assert e.cache_stats.kept[0][0][:2] == [0, 1] and e.cache_stats.kept[0][0][-1] == context - 1  # sinks, recent
    e = run(model, [TechniqueSpec("mustafar", {"sparsity": 0.5, "residual": 0})])[-1]
    assert e.cache_stats.sparsity[0][0] == pytest.approx(0.5, abs=0.01)  # every token pruned by half, none dropped
    e = run(model, [TechniqueSpec("kivi", {"bits": 2, "group": 8, "residual": 0})])[-1]
    assert 2 < e.cache_stats.bits[0][0] < 16 and e.cache_stats.sparsity[0][0] == 0.0


def test_kept_positions_are_dropped_from_a_step_when_too_many(model, monkeypatch):
    monkeypatch.setattr(cache_stats_module, "KEPT_MAX_INTS", 10)
    events = run(model, [], n=2)
    assert all(e.cache_stats.kept is None for e in events) and events[0].cache_stats.tokens


def test_the_store_keeps_per_head_stats_and_a_bounded_number_of_kept_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "KEPT_STORE_STEPS", 2)
    wb = Workbench("random:llama", dtype="float32")
    trace = wb.generate("5 6 7 8 9 10 11 12", "cache=streaming:fraction=0.5,sinks=1;max_new_tokens=40")
    with Store(tmp_path / "runs.duckdb") as store:
        store.begin(trace)
        store.finish(trace)
        rows = store.con.execute("SELECT step, layer, head, tokens_held, bits, kept, simulated FROM cache_stats "
                                 "ORDER BY step, layer, head").fetchall()
    layers, heads = len(trace.events[-1].cache_stats.tokens), len(trace.events[-1].cache_stats.tokens[0])
    steps = sorted({r[0] for r in rows})
    assert len(rows) == len(steps) * layers * heads and len(steps) <= writer.CACHE_SAMPLE_STEPS + 2
    kept_steps = sorted({r[0] for r in rows if r[5] is not None})
    assert len(kept_steps) == 2 and kept_steps[-1] == trace.events[-1].step
    last = [r for r in rows if r[0] == kept_steps[-1]]
    assert last[0][5] == trace.events[-1].cache_stats.kept[0][0] and last[0][6] is False


def test_the_kept_positions_of_a_run_are_bounded_in_all(tmp_path, monkeypatch):
    trace = Workbench("random:llama", dtype="float32").generate("5 6 7 8 9 10 11 12", "max_new_tokens=40")
    last = sum(len(h) for layer in trace.events[-1].cache_stats.kept for h in layer)
    monkeypatch.setattr(writer, "KEPT_STORE_INTS", last * 3 // 2)  # room for the last sample, not two
    with Store(tmp_path / "runs.duckdb") as store:
        store.begin(trace)
        store.finish(trace)
        (total,) = store.con.execute("SELECT coalesce(sum(len(kept)), 0) FROM cache_stats").fetchone()
    assert total == last


def test_a_version_2_store_gains_the_kept_and_simulated_columns(tmp_path):
    path = tmp_path / "runs.duckdb"
    con = duckdb.connect(str(path))  # a store as version 2 of the workbench left it
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP)")
    for version in (1, 2):
        for statement in writer.MIGRATIONS[version]:
            con.execute(statement)
        con.execute("INSERT INTO schema_version VALUES (?, now())", [version])
    con.execute("INSERT INTO cache_stats VALUES ('old', 0, 0, NULL, 5, NULL, NULL, 0.0)")  # a v2 row survives
    con.close()
    trace = Workbench("random:llama", dtype="float32").generate("5 6 7", "max_new_tokens=3")
    with Store(path) as store:
        store.begin(trace)
        store.finish(trace)
        assert store.con.execute("SELECT max(version) FROM schema_version").fetchone() == (writer.SCHEMA_VERSION,)
        assert store.con.execute("SELECT kept, simulated FROM cache_stats WHERE run_id = 'old'").fetchall() == \
            [(None, None)]
        assert store.con.execute("SELECT count(*) FROM cache_stats WHERE run_id = ? AND kept IS NOT NULL",
                                 [trace.run_id]).fetchone()[0] > 0
