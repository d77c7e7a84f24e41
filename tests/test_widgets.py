"""The notebook widgets' Python state on a tiny random model: Race against Workbench.generate, Stop, the
token stream's appends, the views' figures against the view functions, SpecBuilder against the registry,
RunsBrowser on a temporary store."""

from __future__ import annotations

import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("anywidget")

from workbench import registry  # noqa: E402
from workbench.api import Workbench  # noqa: E402
from workbench.errors import SpecError  # noqa: E402
from workbench.metrics import acceptance_per_position  # noqa: E402
from workbench.spec import RunSpec  # noqa: E402
from workbench.store import Store  # noqa: E402
from workbench.views.figures import tree_figure  # noqa: E402
from workbench.views.kv import METRICS, kv_grid  # noqa: E402
from workbench.views.tokens import kept_mask_html, tokens_html  # noqa: E402
from workbench.widgets import AcceptanceView, DraftTreeView, KVView, Race, RunsBrowser, SpecBuilder  # noqa: E402
from workbench.widgets.common import upto  # noqa: E402
from workbench.widgets.race import lane_title  # noqa: E402

PROMPT = "5 6 7 8 9 10 5 6 7 8 9 10 5 6"  # repeats: prompt lookup drafts
SPECS = ["decode=plain", "decode=prompt_lookup:k=4", "cache=h2o:budget=8"]


@pytest.fixture(scope="module")
def raced(tmp_path_factory):
    """A race of three configurations recorded into a temporary store (closed afterwards, for the reader),
    with every message its token streams sent."""
    path = tmp_path_factory.mktemp("widgets") / "runs.duckdb"
    store = Store(path)
    wb = Workbench("random:llama", store=store)
    race = Race(PROMPT, [SPECS[0], SPECS[1], SpecBuilder(SPECS[2])], wb=wb,
                max_new_tokens=10, every_s=0, start=False)
    sent: list[list[dict]] = [[] for _ in race.streams]
    for stream, out in zip(race.streams, sent):
        stream.send = out.append  # what the browser would receive
    race.start()
    race.wait(120)
    store.close()
    wb.store = None
    return wb, race, sent, path


def test_race_runs_each_spec_as_generate_does(raced):
    wb, race, _, _ = raced
    assert not race.running and race.error is None and race.status.value == "done"
    assert len(race.traces) == 3
    for spec, trace in zip(race.specs, race.traces):
        assert trace.status == "done"
        assert trace.token_ids == wb.generate(PROMPT, spec).token_ids, spec.to_string()
    assert race.specs[2] == wb.spec(SPECS[2], max_new_tokens=10)  # the SpecBuilder's spec was raced
    assert race.tokens_shown == sum(len(t.token_ids) for t in race.traces)
    for stats, trace in zip(race.stats, race.traces):
        assert f"{trace.summary()['tok_per_s']:.1f} tok/s" in stats.value and "mean accepted length" in stats.value
    assert race.updates == race.rounds + 1  # every_s=0: one update per round, and the final one
    titles = [lane_title(s) for s in race.specs]
    assert [d.name for d in race.timeline.data if d.showlegend is not False] == titles
    assert [t.split(";")[0].split(":")[0] for t in titles] == ["decode=plain", "decode=prompt_lookup", "decode=plain"]


def test_token_stream_sends_only_new_spans_then_the_final_text(raced):
    _, race, sent, _ = raced
    for stream, messages, trace in zip(race.streams, sent, race.traces):
        appends = [m["html"] for m in messages if m["type"] == "append"]
        assert len(appends) >= 2 and stream.appends == len(appends)
        for token in trace.token_ids:  # every token's span was sent
            assert any(f"id {token} " in a for a in appends)
        assert sum(a.count('class="wb-tok') for a in appends) == len(trace.token_ids)
        assert messages[-1] == {"type": "reset", "html": tokens_html(trace, race.label)}
        assert stream.html == tokens_html(trace, race.label)
        replies = []
        stream.send = replies.append
        stream._on_message(stream, {"type": "want"}, None)  # a browser drawing the widget asks for it all
        assert replies == [{"type": "reset", "html": stream.html}]


def test_stop_ends_the_race_within_a_step():
    wb = Workbench("random:llama")
    race = Race(PROMPT, ["decode=plain", "decode=prompt_lookup"], wb=wb, max_new_tokens=200, ignore_eos=True,
                every_s=0, on_update=lambda r: r.stop() if r.rounds >= 3 else None)
    traces = race.wait(120)
    assert race.status.value == "stopped" and race.stop_button.disabled
    for trace in traces:
        assert trace.status == "interrupted"
        assert len(trace.events) == 3  # the three rounds before the stop, none after
    assert race.traces == traces


def test_race_refuses_bad_input():
    wb = Workbench("random:llama")
    with pytest.raises(ValueError, match="one to 4 configurations; got 0"):
        Race(PROMPT, [], wb=wb)
    with pytest.raises(ValueError, match="got 5"):
        Race(PROMPT, ["decode=plain"] * 5, wb=wb)
    with pytest.raises(SpecError, match="unknown decoding technique 'nope'"):
        Race(PROMPT, ["decode=nope"], wb=wb)


def test_draft_tree_view_slider_redraws_the_figure(raced):
    wb, race, _, _ = raced
    trace = race.traces[1]
    view = DraftTreeView(trace, wb)
    assert len(view.steps) >= 2 and all(next(e for e in trace.events if e.step == s).tree for s in view.steps)
    for step in (view.steps[-1], view.steps[0]):
        view.slider.value = step
        expected = view.make_figure(step)
        assert f"step {step}" in view.figure.layout.title.text
        assert view.figure.data[-1].hovertext == expected.data[-1].hovertext
    event = next(e for e in trace.events if e.step == view.steps[0])
    assert len(view.figure.data[-1].x) == len(event.tree.tokens) + 1  # the root and every node
    plain = DraftTreeView(race.traces[0])  # plain decoding drafts nothing: the figure says so
    assert "no draft at this step" in plain.figure.layout.annotations[0].text
    assert tree_figure(None, str, 0).layout.annotations[0].text == plain.figure.layout.annotations[0].text


def test_acceptance_view_shows_the_metrics(raced):
    _, race, _, _ = raced
    view = AcceptanceView(race.traces)
    measured = [d for d in view.acceptance.data if d.name.endswith("measured")]
    assert [d.name for d in measured] == [race.traces[1].spec.to_string() + " measured"]
    assert list(measured[0].y) == acceptance_per_position(race.traces[1])
    assert len(view.lengths.data) == 3
    figure = view.acceptance
    view.update([race.traces[0]], names=["plain"])
    assert view.acceptance is figure and "no drafted tokens" in figure.layout.annotations[0].text
    with pytest.raises(ValueError, match="2 names for 1 traces"):
        AcceptanceView([race.traces[0]], names=["a", "b"])


def test_kv_view_heatmap_and_mask_follow_the_controls(raced):
    wb, race, _, _ = raced
    trace = race.traces[2]
    view = KVView(trace, wb)
    shown = 0
    for metric in METRICS:
        for step in (trace.events[1].step, trace.events[-1].step):
            view.metric.value, view.step.value = metric, step
            grid = kv_grid(next(e for e in trace.events if e.step == step), metric)
            if grid is None:
                continue
            assert [list(row) for row in view.heatmap.data[0].z] == grid[0]
            shown += 1
    assert shown >= 4
    view.layer.value, view.step.value = 1, trace.events[2].step
    assert view.mask.value == kept_mask_html(upto(trace, trace.events[2].step), view.label, 1, 0)
    with pytest.raises(ValueError, match="unknown KV metric 'x'; choose one of bytes"):
        KVView(trace, metric="x")


def test_spec_builder_matches_the_parsed_string_and_refuses_bad_values():
    builder = SpecBuilder()
    assert builder.spec == RunSpec().validated() and builder.error == ""
    builder.categories["decoding"].choice.value = "prompt_lookup"
    builder.categories["decoding"].params["k"][1].value = 8
    builder.categories["cache"].choice.value = "kivi"
    builder.categories["cache"].params["bits"][1].value = 2
    builder.sampling["temperature"].value = 0.5
    text = "decode=prompt_lookup:k=8;cache=kivi:bits=2;temperature=0.5"
    assert builder.spec == RunSpec.parse(text).validated()
    assert builder.spec.to_string() in builder.output.value
    assert SpecBuilder(text).spec == builder.spec  # and back from the string
    builder.categories["decoding"].params["k"][1].value = -3
    with pytest.raises(SpecError) as registry_says:
        registry.get("decoding", "prompt_lookup").validate({"k": -3})
    with pytest.raises(SpecError) as builder_says:
        _ = builder.spec
    assert str(builder_says.value) == str(registry_says.value) == builder.error
    assert builder.error in builder.output.value and "expected k (int" in builder.error
    with pytest.raises(SpecError, match="one technique per category"):
        builder.load("cache=kivi+h2o")


def test_spec_builder_has_controls_for_every_registered_technique():
    builder = SpecBuilder()
    for category, controls in builder.categories.items():
        for technique in registry.techniques(category):
            if technique.name.startswith("_"):
                continue
            controls.choice.value = technique.name
            assert set(controls.params) == {p.name for p in technique.params}
            for p in technique.params:  # each control starts at the parameter's default
                assert controls.params[p.name][1].value == p.default
            assert builder.error == "", f"{category} {technique.name}: {builder.error}"
        # then a drafter every acceptor takes (it reports its draft distribution, which lexical_unit reads)
        controls.choice.value = "draft_model" if category == "decoding" else controls.choice.options[0]


def test_runs_browser_lists_filters_compares_and_opens(raced):
    wb, race, _, path = raced
    browser = RunsBrowser(path, wb)
    ids = [value for _, value in browser.picked.options]
    assert {t.run_id for t in race.traces} <= set(ids)
    browser.decode.value = "prompt_lookup"
    assert [value for _, value in browser.picked.options] == [race.traces[1].run_id]
    browser.decode.value = "all"
    browser.text.value = "h2o"
    assert [value for _, value in browser.picked.options] == [race.traces[2].run_id]
    browser.compare([t.run_id for t in race.traces])
    assert browser.message.value == "comparing 3 runs" and browser.compare_figure.data
    opened = browser.open_run(race.traces[1].run_id[:8])
    assert opened.token_ids == race.traces[1].token_ids and browser.opened is opened
    kinds = [type(c).__name__ for c in browser.opened_box.children]
    assert "DraftTreeView" in kinds and "KVView" in kinds
    browser._guard(lambda: browser.open_run("zz"))
    assert "is not a run id" in browser.message.value


def test_a_click_on_a_sweep_point_selects_compares_and_opens_its_runs(tmp_path):
    from plotly.callbacks import Points

    from workbench.store import Store
    from workbench.sweep import Grid, make_executor, run_sweep

    grid = Grid(specs=["", "decode=prompt_lookup:k=4"], prompts=["5 6 7 8 5 6 7 8", "9 10 11 9 10 11"],
                max_new_tokens=5, model="random:llama", dtype="float32")
    with Store(tmp_path / "runs.duckdb") as store:
        run_sweep(grid, make_executor(grid), store, progress=False)
    browser = RunsBrowser(tmp_path / "runs.duckdb")
    view = browser.sweeps
    assert view.sweep.value == grid.sweep_id() and "4 finished cells" in view.message.value
    points = [t for t in view.figure.data if t.customdata is not None]
    assert sorted(t.name for t in points) == ["decode=prompt_lookup:k=4", "plain"]
    clicked = points[0]
    clicked._dispatch_on_click(Points(point_inds=[0], xs=list(clicked.x), ys=list(clicked.y)), None)
    run_ids = clicked.customdata[0][0].split(",")
    assert list(browser.picked.value) == run_ids and browser.message.value.startswith("opened ")
    assert browser.opened.run_id == run_ids[0] and browser.compare_figure.data
    view.metric.value = "target_perplexity"
    assert view.figure.layout.yaxis.title.text.startswith("target_perplexity")
