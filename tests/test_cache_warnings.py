"""A cache policy says when its figures would mislead: a budget the context never reaches evicts nothing, and
SnapKV on a prompt no longer than its observation window keeps the same suffix in every head (a sliding
window). The warnings reach the run's summary, `generate --json`, the store and a replayed run."""

from __future__ import annotations

import json

import pytest

from workbench.api import Workbench
from workbench.cli import main
from workbench.store import Store
from workbench.views.replay import load_trace

PROMPT = " ".join(str(5 + i % 20) for i in range(40))  # 40 token ids


@pytest.fixture(scope="module")
def wb():
    return Workbench("random:llama", dtype="float32")


def warnings(wb, spec: str, prompt: str = PROMPT) -> list[str]:
    return wb.generate(prompt, spec + ";max_new_tokens=4").summary()["warnings"]


@pytest.mark.parametrize("spec, words", [
    ("cache=snapkv", ["snapkv", "all 40 prompt tokens", "evicts nothing"]),
    ("cache=snapkv:fraction=0.5", ["snapkv", "same last 20 prompt tokens", "sliding window"]),
    ("cache=snapkv:budget=16,window=16", ["same last 16", "sliding window"]),
    ("cache=h2o", ["h2o", "1024 tokens", "40 tokens + 4 new", "evicts nothing"]),
    ("cache=streaming:sinks=4,window=60", ["streaming", "64 tokens", "evicts nothing"]),
    ("cache=h2o:budget=30,continuous=false", []),
    ("cache=h2o:budget=42", []),  # 40 + 4 new tokens pass 42: it evicts while decoding
    ("cache=snapkv:budget=24,window=8", []),  # votes choose 16 of the 32 tokens before the window
    ("cache=h2o:fraction=0.5", []),
    ("cache=kivi", []),
])
def test_a_policy_warns_when_its_figures_would_mislead(wb, spec, words):
    found = warnings(wb, spec)
    if not words:
        assert found == []
        return
    assert len(found) == 1 and all(w in found[0] for w in words), found


def test_warnings_reach_json_the_store_and_a_replay(wb, tmp_path, capsys):
    code = main(["generate", PROMPT, "--model", "random:llama", "--no-chat", "--json", "--no-store",
                 "--spec", "max_new_tokens=3;cache=snapkv"])
    assert code == 0 and "evicts nothing" in json.loads(capsys.readouterr().out)["warnings"][0]
    store = Store(tmp_path / "runs.duckdb")
    wb.store = store
    try:
        trace = wb.generate(PROMPT, "max_new_tokens=3;cache=snapkv:fraction=0.5")
        wb.generate(PROMPT, "max_new_tokens=3")
        rows = store.con.execute("SELECT run_id, warnings FROM run_summary ORDER BY created_at").fetchall()
        assert rows[0] == (trace.run_id, trace.summary()["warnings"]) and "sliding window" in rows[0][1][0]
        assert rows[1][1] == []
        replayed = load_trace(lambda sql: store.con.sql(sql).to_arrow_table(), trace.run_id)
        assert replayed.summary()["warnings"] == trace.summary()["warnings"]
    finally:
        wb.store = None
        store.close()
