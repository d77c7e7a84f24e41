"""The Gradio app through gradio_client against a live local server (a tiny random model), plus its pure parts."""

from __future__ import annotations

import html
import json
import re
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

from workbench.apps import presets  # noqa: E402
from workbench.apps.context import AppContext  # noqa: E402
from workbench.apps.server import launched_locally  # noqa: E402
from workbench.engine import TreeRecord  # noqa: E402
from workbench.views import figures as views  # noqa: E402
from workbench.views.kv import kept_positions, kv_grid  # noqa: E402
from workbench.views.live import race  # noqa: E402

PROMPT = "5 6 7 8 9 10 5 6 7 8 9 10 5 6"
N_RUN = 20  # outputs of a generation seen by the client (4 columns x 3, 7 views, the status; the state is not)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A live server on a free port with a tiny random model and its own store; torn down after the module."""
    store = tmp_path_factory.mktemp("app") / "runs.duckdb"
    ctx = AppContext.create("random:llama", "float32", "cpu", store)
    try:
        with launched_locally(ctx) as (demo, url):
            yield SimpleNamespace(ctx=ctx, client=Client(url, verbose=False), demo=demo)
    finally:
        ctx.close()


def generate(app, *specs: str, prompt: str = PROMPT, max_new: int = 10) -> tuple:
    boxes = list(specs) + [""] * (4 - len(specs))
    return app.client.predict(prompt, True, max_new, len(specs), *boxes, 1, "tokens", 0, 0, api_name="/generate")


def token_ids(html: str) -> list[int]:
    """Generated token ids shown in a column (prompt spans left out)."""
    return [int(m) for cls, m in re.findall(r'class="wb-tok wb-(\w+)" title="id (\d+)', html) if cls != "prompt"]


def sql(app, query: str) -> tuple:
    return app.client.predict(query, api_name="/sql")


def test_side_by_side_generation_is_recorded(app):
    out = generate(app, "decode=plain", "decode=prompt_lookup:k=4")
    plain, lookup = token_ids(out[0]), token_ids(out[3])
    assert len(plain) == 10 and plain == lookup  # prompt lookup is lossless: the same greedy tokens
    assert "tok/s" in out[1] and "mean accepted length" in out[4] and "KV cache" in out[4]
    run_ids = [re.search(r"\?run=([0-9a-f]+)", out[i]).group(1) for i in (2, 5)]
    assert "?spec=decode%3Dprompt_lookup%3Ak%3D4" in out[5]
    acceptance = json.loads(out[13]["plot"])
    assert any("prompt_lookup measured" in t.get("name", "") for t in acceptance["data"])
    assert out[-1].startswith("done: 2 of 2")
    stored = sql(app, "SELECT run_id, status, n_new_tokens FROM runs")[0]
    rows = {r[0]: r for r in stored["data"]}
    assert all(rows[r][1] == "done" and rows[r][2] == 10 for r in run_ids)


def test_run_permalink_replays_the_stored_trace(app):
    out = generate(app, "decode=prompt_lookup:k=4", max_new=12)
    run_id = re.search(r"\?run=([0-9a-f]+)", out[2]).group(1)
    opened = app.client.predict(f"run={run_id[:8]}", api_name="/open_link")
    run = opened[-N_RUN:]
    assert token_ids(run[0]) == token_ids(out[0])  # same tokens, now from the store
    assert f"opened run `{run_id}`" in run[-1]
    assert "replayed from the store" in run[1]
    prompt_at = len(opened) - N_RUN - 8
    assert opened[prompt_at] == PROMPT and opened[prompt_at + 2] == 12 and opened[prompt_at + 3] == 1
    assert opened[prompt_at + 4] == "decode=prompt_lookup:k=4"
    lengths = json.loads(run[14]["plot"])
    assert sum(lengths["data"][0]["x"]) == 12 - 1  # tokens per decoding step; the prefill chose the first


def test_spec_permalink_opens_configurations(app):
    opened = app.client.predict("spec=decode%3Dprompt_lookup%3Ak%3D4&spec=temperature%3D0.5&max_new_tokens=7",
                                api_name="/open_link")
    at = len(opened) - N_RUN - 8
    assert opened[at + 2] == 7 and opened[at + 3] == 2
    assert list(opened[at + 4 : at + 6]) == ["decode=prompt_lookup:k=4", "decode=plain;temperature=0.5"]
    bad = app.client.predict("spec=decode%3Dnope", api_name="/open_link")
    assert "unknown decoding technique 'nope'" in bad[-1]


def linked(opened: tuple) -> dict:
    """What an opened link set, by name (the outputs before a run's)."""
    at = len(opened) - N_RUN - 8
    return {"prompt": opened[at], "chat": opened[at + 1], "max_new_tokens": opened[at + 2],
            "columns": opened[at + 3], "specs": list(opened[at + 4: at + 8]), "status": opened[-1]}


def test_comparison_link_reproduces_the_comparison(app):
    """The status line's link reopens the prompt, the chat setting, every column's spec and max new tokens;
    a plain column's box says `decode=plain` rather than opening empty."""
    prompt = "5 6 7 & 8 ; 9 # 10"  # characters a URL must escape
    out = app.client.predict(prompt, False, 6, 3, "decode=plain", "decode=prompt_lookup:k=4", "", "", 1,
                             "tokens", 0, 0, api_name="/generate")
    query = re.search(r"\[link to this comparison\]\(\?([^)]*)\)", out[-1]).group(1)
    opened = linked(app.client.predict(query, api_name="/open_link"))
    assert opened["prompt"] == prompt and opened["chat"] is False and opened["max_new_tokens"] == 6
    assert opened["columns"] == 3
    assert opened["specs"][:3] == ["decode=plain", "decode=prompt_lookup:k=4", "decode=plain"]
    assert "problems" not in opened["status"]


def test_spec_link_of_five_columns_says_the_fifth_is_left_out(app):
    query = "&".join(f"spec=decode%3Dprompt_lookup%3Ak%3D{k}" for k in range(1, 6))
    opened = linked(app.client.predict(query, api_name="/open_link"))
    assert opened["columns"] == 4 and opened["specs"][3] == "decode=prompt_lookup:k=4"
    assert "5 configurations" in opened["status"] and "left out 5: decode=prompt_lookup:k=5" in opened["status"]


def test_a_cache_warning_shows_under_its_column(app):
    out = generate(app, "cache=snapkv", "decode=plain", max_new=3)
    assert "⚠" in out[1] and "evicts nothing" in html.unescape(out[1])  # column 1's stats line
    assert "⚠" not in out[4]


def test_max_new_tokens_beyond_the_control_is_clamped_saying_so(app):
    opened = linked(app.client.predict("spec=decode%3Dplain&max_new_tokens=5000", api_name="/open_link"))
    assert opened["max_new_tokens"] == 1024
    assert "max_new_tokens=5000 is outside the app's 1 to 1024; set to 1024" in opened["status"]
    opened = linked(app.client.predict("spec=decode%3Dplain%3Bmax_new_tokens%3D2000", api_name="/open_link"))
    assert opened["max_new_tokens"] == 1024 and "max_new_tokens=2000 is outside" in opened["status"]
    with pytest.raises(Exception, match="greater than maximum value 1024"):  # the control refuses, saying why
        generate(app, "decode=plain", max_new=5000)


def test_comparison_link_leaves_out_a_prompt_too_long_for_a_link():
    from workbench.apps.generate_tab import MAX_LINK_PROMPT, comparison_link

    assert "prompt=" in comparison_link("a b", True, ["decode=plain"], 8)
    long = comparison_link("x" * (MAX_LINK_PROMPT + 1), True, ["decode=plain"], 8)
    assert "prompt=" not in long and "too long for a link" in long and "spec=decode%3Dplain" in long


@pytest.mark.parametrize("text, name", [
    ("decode=plain", "plain"), ("", "plain"), (" decode=prompt_lookup ", "prompt lookup"),
    ("decode=prompt_lookup:k=4", "(custom)"), ("decode=token_recycling;cache=kivi:bits=2",
                                               "token recycling + KIVI 2-bit"),
    ("decode=plain;temperature=0.7", "(custom)"), ("decode=", "(custom)"), ("decode=nope", "(custom)")])
def test_preset_menu_names_the_preset_the_spec_equals(text, name):
    if name != "(custom)" and name not in presets.available_presets():
        pytest.fail(f"preset {name!r} is not offered: {presets.available_presets()}")
    assert presets.preset_for(text) == name


@pytest.mark.parametrize("query", ["DROP TABLE runs", "SELECT * FROM read_csv('/etc/passwd')",
                                   "SELECT 1; DROP TABLE runs", "INSERT INTO runs (run_id, status) VALUES ('a', 'x')",
                                   "COPY runs TO 'x.csv'", "SELECT * FROM 'file.csv'"])
def test_sql_refusals(app, query):
    before = sql(app, "SELECT count(*) AS n FROM runs")[0]["data"]
    _, _, message = sql(app, query)
    assert "refused" in message or "not allowed" in message
    assert "Traceback" not in message
    assert sql(app, "SELECT count(*) AS n FROM runs")[0]["data"] == before


def test_sql_result_and_plot(app):
    out = generate(app, "decode=plain", max_new=6)
    run_id = re.search(r"\?run=([0-9a-f]+)", out[2]).group(1)
    table, plot, message = sql(app, f"SELECT step, cache_bytes FROM steps WHERE run_id = '{run_id}' ORDER BY step")
    assert table["headers"] == ["step", "cache_bytes"] and len(table["data"]) == 6 and "6 rows" in message
    figure = json.loads(plot["value"]["plot"])  # two numeric columns: a plot of the second against the first
    assert plot["visible"] and figure["data"][0]["x"] == [0, 1, 2, 3, 4, 5]
    _, plot, _ = sql(app, "SELECT run_id, status FROM runs")
    assert plot["visible"] is False


@pytest.mark.parametrize("prompt, spec, message", [
    (PROMPT, "decode=nonexistent", "unknown decoding technique 'nonexistent'"),
    (PROMPT, "decode=prompt_lookup:k=0", "out of range"),
    (PROMPT, "model=other-model", "this app runs every configuration on random:llama"),
    ("not token ids", "decode=plain", "space-separated token ids"),
    (" ".join(["5"] * 600), "decode=plain", "context window"),
])
def test_bad_input_is_a_message_not_a_traceback(app, prompt, spec, message):
    out = generate(app, spec, prompt=prompt)
    assert message in html.unescape(out[0])
    assert "Traceback" not in out[0] and "failed" in out[-1]


def test_empty_prompt_and_bad_run_id(app):
    out = generate(app, "decode=plain", prompt="   ")
    assert "prompt is empty" in out[-1]
    opened = app.client.predict("run=x'; DROP TABLE runs; --", api_name="/open_link")
    assert "is not a run id" in opened[-1]
    opened = app.client.predict("run=ffffffff", api_name="/open_link")
    assert "no run has an id starting with" in opened[-1]


def test_runs_table_and_compare(app):
    generate(app, "decode=plain", "decode=prompt_lookup", max_new=4)
    table, _, selected, message = app.client.predict("all", "all", "", [], api_name="/runs")
    assert "runs shown" in message and table["headers"][0] == "run_id"
    ids = [r[0] for r in table["data"][:2]]
    bars, acceptance, timeline, note = app.client.predict(ids, api_name="/compare")
    assert note == "comparing 2 runs"
    assert len(json.loads(bars["plot"])["data"]) >= 3  # tok/s, accepted length, bytes at least


def test_race_stops_one_column_and_times_each_lane_alone(app):
    """A stopped column is recorded as interrupted while the other runs to the end; elapsed times are each
    lane's own (their sum stays within the wall time of the whole race)."""
    stop_after = {1: 3}
    rounds = [0]

    def stopped(lane: int) -> bool:
        return lane in stop_after and rounds[0] >= stop_after[lane]

    start = time.perf_counter_ns()
    for lanes in race(app.ctx.wb, PROMPT, ["decode=plain", "decode=plain"], stopped, max_new_tokens=12):
        rounds[0] += 1
        assert len(lanes) == 2
    wall = time.perf_counter_ns() - start
    assert [lane.status for lane in lanes] == ["done", "stopped"]
    assert len(lanes[0].trace.token_ids) == 12 and len(lanes[1].trace.token_ids) == 3
    assert lanes[1].trace.status == "interrupted"
    own = [lane.trace.events[-1].elapsed_ns for lane in lanes]
    assert sum(own) <= wall
    elapsed = [e.elapsed_ns for e in lanes[0].trace.events]
    assert elapsed == sorted(elapsed)
    stored = sql(app, f"SELECT status FROM runs WHERE run_id = '{lanes[1].trace.run_id}'")[0]["data"]
    assert stored == [["interrupted"]]


def test_stop_button_interrupts_the_running_generation(app):
    job = app.client.submit(PROMPT, True, 1024, 1, "decode=plain", "", "", "", 1, "tokens", 0, 0,
                            api_name="/generate")
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:  # wait for the first streamed update
        time.sleep(0.05)
    app.client.predict(api_name="/stop_all")  # the same client, so the same browser session
    out = job.result(timeout=120)
    assert "1 stopped early" in out[-1] and "stopped" in out[1]
    assert len(token_ids(out[0])) < 512 - 14  # what the random model's context window leaves after the prompt
    run_id = re.search(r"\?run=([0-9a-f]+)", out[2]).group(1)
    assert sql(app, f"SELECT status FROM runs WHERE run_id = '{run_id}'")[0]["data"] == [["interrupted"]]


def test_one_engine_call_at_a_time_and_the_console_stays_responsive(app):
    generating = [f for f in app.demo.fns.values() if f.api_name == "generate"]
    assert [(f.concurrency_id, f.concurrency_limit) for f in generating] == [("engine", 1)]
    sql_fn = next(f for f in app.demo.fns.values() if f.api_name == "sql")
    assert sql_fn.concurrency_id != "engine"
    assert app.demo._queue.max_size == app.ctx.queue_size
    job = app.client.submit(PROMPT, True, 1024, 2, "decode=plain", "decode=plain", "", "", 1, "tokens", 0, 0,
                            api_name="/generate")
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:
        time.sleep(0.02)
    table, _, _ = sql(app, "SELECT count(*) AS n FROM runs")  # answered while the engine is busy
    assert table["data"] and not job.done()
    app.client.predict(api_name="/stop_all")
    job.result(timeout=120)


# ---- pure parts -----------------------------------------------------------------------------------------------

def test_tree_figure_highlights_the_accepted_path():
    tree = TreeRecord(tokens=[11, 12, 13, 14], parents=[-1, 0, -1, 1], depths=[1, 2, 1, 3],
                      draft_probs=[0.5, 0.4, None, 0.9], target_probs=[0.6, 0.2, 0.1, 0.3],
                      accepted=[True, True, False, False])
    fig = views.tree_figure(tree, str, step=3, root_token=10)
    rejected_edges, accepted_edges, nodes = fig.data
    assert [x for x in accepted_edges.x if x is not None] == [0, 1, 1, 2]  # root -> 11 -> 12
    assert nodes.marker.color[1] == views.ACCEPTED and nodes.marker.color[3] == views.REJECTED
    assert "min(1, p/q) = 0.500" in nodes.hovertext[2]  # node 12: p 0.2 / q 0.4
    assert "2 of 4" in fig.layout.title.text


def test_kv_views_use_cache_stats_and_fall_back_to_layer_counts():
    stats = SimpleNamespace(tokens=[[5, 3], [5, 5]], bytes=[[80, 48], [80, 80]], bits=None,
                            sparsity=[[0.0, 0.4], [0.0, 0.0]], simulated=True,
                            kept=[[[0, 1, 2, 3, 4], [0, 3, 4]], [[0, 1, 2, 3, 4]] * 2])
    event = SimpleNamespace(positions=[5], cache_tokens=[5, 5], cache_bytes=320, step=4, cache_stats=stats)
    z, note = kv_grid(event, "bytes")
    assert z == [[80, 48], [80, 80]] and "simulated" in note
    assert kept_positions(event, 0, 1) == {0, 3, 4}
    plain = SimpleNamespace(positions=[5], cache_tokens=[5, 2], cache_bytes=700, step=4)
    assert kv_grid(plain, "tokens")[0] == [[5], [2]]
    assert kv_grid(plain, "bytes")[0] == [[500.0], [200.0]]
    assert kept_positions(plain, 0, 0) == set(range(5)) and kept_positions(plain, 1, 0) is None


def test_every_offered_preset_runs_or_says_why(app):
    """Presets come and go with the registry; each one the app offers runs in a race on the tiny model, or
    fails with the technique's own message (a 4-layer model cannot hold a 4-layer self-draft), never a bug."""
    offered = presets.available_presets()
    assert {"plain", "prompt lookup"} <= set(offered)
    *_, lanes = race(app.ctx.wb, PROMPT, list(offered.values()), lambda lane: False, max_new_tokens=6)
    for name, lane in zip(offered, lanes):
        assert lane.status == "done" or not lane.error.startswith("internal error"), (name, lane.error)
    assert sum(lane.status == "done" for lane in lanes) >= len(lanes) - 1


@pytest.mark.parametrize("text, techniques", [
    ("decode=prompt_lookup:k=4,prefer=recent;accept=typical:epsilon=0.2;temperature=0.5;top_k=5;seed=3", 2),
    ("decode=token_recycling", 1), ("", 1)])
def test_controls_edit_the_spec_box_both_ways(text, techniques):
    """The controls generated from the registry show a spec (from_spec) and write the same spec back (to_spec)."""
    import gradio as gr

    from workbench.apps.controls import build_column_controls

    with gr.Blocks():
        cc = build_column_controls(0, "decode=plain")
    editors = cc.editors()
    updates = cc.from_spec(text)
    assert cc.to_spec(*updates[: len(editors)]) == text
    visible = [u["visible"] for u in updates[len(editors):]]
    assert sum(visible) == techniques  # only the chosen techniques' parameters show
    assert cc.from_spec("decode=") == [gr.skip()] * len(updates)  # half-typed: the controls stay as they are


def test_presets_hide_unregistered_techniques(monkeypatch):
    monkeypatch.setattr(presets, "PRESETS", {"plain": "decode=plain", "ghost": "decode=plain;cache=no_such_policy"})
    assert presets.available_presets() == {"plain": "decode=plain"}


def test_cli_app_options():
    from workbench.cli import build_parser

    args = build_parser().parse_args(["app", "--port", "7000", "--model", "random:llama", "--no-store"])
    assert (args.host, args.port, args.model, args.no_store, args.share) == ("127.0.0.1", 7000, "random:llama",
                                                                             True, False)


def test_a_missing_chromium_fails_the_browser_tests_with_the_install_command(monkeypatch, tmp_path):
    from workbench.apps import render_probe

    monkeypatch.setattr(render_probe, "CHROMIUM", str(tmp_path / "chromium"))
    with pytest.raises(RuntimeError, match=r"apt-get install -y chromium"):
        render_probe.launch_chromium(None)
