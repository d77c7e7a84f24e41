"""The app's views as pure functions (figures, token HTML, stats lines, technique notes, Runs-tab labels and
export), and the view wiring on a built (not served) app, on a tiny random model."""

from __future__ import annotations

import csv
import json
import re
from types import SimpleNamespace

import pytest

pytest.importorskip("gradio")

from workbench.apps.about import paper, spec_about  # noqa: E402
from workbench.apps.context import AppContext  # noqa: E402
from workbench.apps.runs_tab import export_runs  # noqa: E402
from workbench.apps.server import build_app  # noqa: E402
from workbench.views import figures as views  # noqa: E402
from workbench.views.live import race  # noqa: E402
from workbench.views.palette import column_color  # noqa: E402
from workbench.views.replay import load_trace  # noqa: E402
from workbench.views.runs import config_label  # noqa: E402
from workbench.views.tokens import CSS, _span, byte_label, gpt2_byte_decoder, stats_markdown, tokens_html  # noqa: E402

PROMPT = "5 6 7 8 9 10 5 6 7 8 9 10 5 6"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A built app (not served) with its own store, and two recorded runs: plain and prompt lookup."""
    ctx = AppContext.create("random:llama", "float32", "cpu", tmp_path_factory.mktemp("views") / "runs.duckdb")
    try:
        demo = build_app(ctx)
        *_, lanes = race(ctx.wb, PROMPT, ["decode=plain", "decode=prompt_lookup:k=4"], lambda lane: False,
                         max_new_tokens=10)
        yield SimpleNamespace(ctx=ctx, demo=demo, plain=lanes[0].trace, lookup=lanes[1].trace)
    finally:
        ctx.close()


def block(demo, elem_id: str):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def handler(demo, elem_id: str, event: str):
    target = block(demo, elem_id)._id
    return next(f for f in demo.fns.values() if (target, event) in f.targets)


def entries(app) -> list[dict]:
    return [{"label": "#1 plain", "trace": app.plain, "status": "done", "spec": "decode=plain"},
            {"label": "#2 prompt_lookup", "trace": app.lookup, "status": "done", "spec": "decode=prompt_lookup:k=4"}]


# ---- item 7: views ----------------------------------------------------------------------------------------------

def test_changing_the_view_column_shows_its_last_step(app):
    """The slider sat at step 0 (from the other column); the newly chosen column opens at its own last step."""
    fn = handler(app.demo, "wb-view-column", "change").fn
    out = fn(entries(app), 2, 0, "tokens", 0, 0)
    slider = out[-1]
    assert slider["value"] == app.lookup.events[-1].step and slider["maximum"] == len(app.lookup.events) - 1


def test_kv_heatmap_says_uniform_values_instead_of_a_flat_scale():
    flat = SimpleNamespace(step=3, positions=[9], cache_tokens=[9, 9], cache_bytes=0,
                           cache_stats=SimpleNamespace(tokens=[[69, 69], [69, 69]], simulated=False))
    fig = views.kv_heatmap(flat, "tokens")
    assert fig.data[0].showscale is False and "uniform: all 4 cells are 69" in fig.layout.title.text
    varied = SimpleNamespace(step=3, positions=[9], cache_tokens=[9, 9], cache_bytes=0,
                             cache_stats=SimpleNamespace(tokens=[[69, 40], [12, 69]], simulated=False))
    fig = views.kv_heatmap(varied, "tokens")
    assert fig.data[0].showscale is not False and "uniform" not in fig.layout.title.text


def test_bits_view_explains_the_full_precision_residual():
    event = SimpleNamespace(step=1, positions=[9], cache_tokens=[9], cache_bytes=0,
                            cache_stats=SimpleNamespace(bits=[[5.1, 9.0]], simulated=False))
    title = views.kv_heatmap(event, "bits").layout.title.text
    assert "residual window" in title and "full-precision" in title
    assert "residual" not in views.kv_heatmap(event, "sparsity").layout.title.text


def test_one_colour_per_column_across_plots_and_token_boxes(app):
    """Column 3 keeps its colour when column 2 has no trace (a failed spec), in every plot and its text box."""
    named = [("#1 plain", app.plain), ("#2 failed", None), ("#3 lookup", app.lookup)]
    colours = {}
    for fig in (views.acceptance_figure(named), views.timeline_figure(named), views.accepted_length_figure(named)):
        for trace in fig.data:
            colour = trace.line.color if trace.type == "scatter" else trace.marker.color
            colours.setdefault(trace.name.split(" ")[0], set()).add(colour)
    assert colours == {"#1": {column_color(0)}, "#3": {column_color(2)}}
    for i in range(4):
        assert f"#wb-tokens-{i + 1} .wb-text {{border-left: 4px solid {column_color(i)}}}" in CSS


def test_byte_tokens_show_their_bytes_not_a_replacement_character():
    decoder = gpt2_byte_decoder()
    assert byte_label(" \ufffd", "Ġæ", decoder) == " <0xE6>"  # byte-level BPE: a space, then a split byte
    assert byte_label("\ufffd", "<0x0a>") == "<0x0A>"  # SentencePiece spells its byte tokens
    assert byte_label("本", "æľ¬", decoder) == "本"  # whole characters are left as they are
    html = _span(" <0xE6>", "wb-bonus", "t")
    assert '<span class="wb-byte">&lt;0xE6&gt;</span>' in html and "\ufffd" not in html


def test_plain_tokens_are_generated_and_drafted_steps_have_a_bonus(app):
    plain = tokens_html(app.plain, str)
    shown = re.sub(r'class="[^"]*"', "", plain)  # what a person reads: the text and the hover titles
    assert "source: generated by the target" in shown and "bonus" not in shown
    drafted = next(e for e in app.lookup.events if e.tree is not None)
    assert "bonus" in tokens_html(SimpleNamespace(**{**app.lookup.__dict__, "events": [drafted]}), str)


def test_replayed_run_names_its_dtype_without_torch(app):
    trace = load_trace(app.ctx.query, app.plain.run_id)
    assert trace.dtype == "float32"


def test_every_plot_names_its_series_on_hover(app):
    named = [("#1 plain", app.plain), ("#2 lookup", app.lookup)]
    rows = [{"run_id": "a" * 16, "tok_per_s": 1.0}, {"run_id": "b" * 16, "tok_per_s": 2.0}]
    figures = [views.acceptance_figure(named), views.timeline_figure(named), views.accepted_length_figure(named),
               views.compare_figure(rows, ["tok_per_s"], ["run a", "run b"])]
    for fig in figures:
        assert fig.data
        for trace in fig.data:
            assert "%{fullData.name}" in trace.hovertemplate, (fig.layout.title.text, trace.name)
            assert trace.name


def test_acceptance_title_does_not_grow_with_columns(app):
    """Per-run figures go into the legend, so four columns give the same title as one."""
    one = views.acceptance_figure([("#1", app.lookup)]).layout.title.text
    four = views.acceptance_figure([(f"#{i}", app.lookup) for i in range(1, 5)]).layout.title.text
    assert one == four and max(len(re.sub("<[^>]+>", "", line)) for line in four.split("<br>")) <= 70


# ---- items 1, 3, 3a, 8 and provenance: the column's stats line ----------------------------------------------------

def fake_trace(**extra):
    summary = {"tok_per_s": 12.5, "mean_accepted_length": 1.5, "cache_bytes": 2 * 2**20, "n_new_tokens": 9,
               "target_forwards": 6, "lossless": True, **extra}
    return SimpleNamespace(events=[object()], status="done", summary=lambda: summary)


def test_stats_mark_lossy_warm_start_simulated_speed_and_warnings():
    clean = stats_markdown(fake_trace(), "done")
    for word in ("lossy", "warm start", "simulated", "⚠"):
        assert word not in clean
    marked = stats_markdown(fake_trace(lossless=False, warm_start=True, simulated=["fp4", "mx"],
                                       warnings=["snapkv: budget 1024 exceeds the 40-token prompt"],
                                       cache_live_bytes=2**20), "done")
    assert "wb-lossy" in marked and ">lossy<" in marked and ">warm start<" in marked
    assert "simulated: fp4, mx" in marked and "budget 1024 exceeds the 40-token prompt" in marked
    assert "2.00 MiB** allocated, **1.00 MiB** live" in marked


def test_stats_show_provenance_compactly_once_the_run_ended():
    provenance = {"commit": "0123456789abcdef", "dirty": True, "cpu": "AMD EPYC", "isa": "avx2", "gpu": None,
                  "backends": {"attention": "sdpa"}, "versions": {"torch": "2.5.1"}, "dtype": "torch.bfloat16",
                  "threads": 2}
    trace = fake_trace(provenance=provenance)
    line = stats_markdown(trace, "done")
    for part in ("commit 0123456789 (dirty)", "AMD EPYC", "avx2", "attention sdpa", "torch 2.5.1", "2 threads"):
        assert part in line
    assert "bfloat16" in line and "torch.bfloat16" not in line
    trace.status = "running"
    assert "0123456789" not in stats_markdown(trace, "running")


# ---- item 8: what the user is looking at -------------------------------------------------------------------------

def test_each_technique_of_a_spec_has_its_summary_and_paper():
    text = spec_about("decode=prompt_lookup;cache=kivi:bits=2;compress=int4")
    assert text.count("<br>") == 2
    assert "**kivi**" in text and "https://arxiv.org/abs/2402.02750" in text
    assert "**prompt_lookup**" in text and "n-gram" in text
    assert spec_about("decode=nope") == ""


def test_every_registered_technique_but_the_baselines_cites_its_paper():
    from workbench import registry

    missing = [t.name for t in registry.techniques() if paper(t) is None and not t.name.startswith("_")]
    # baselines and plumbing: no method of their own (finetune is the uncompressed delta, decided commits
    # what adadec and astar chose)
    assert set(missing) <= {"plain", "dense", "h2o", "finetune", "decided"}, missing


def test_every_view_says_what_it_shows(app):
    named = [("#1", app.lookup)]
    drafted = next(e for e in app.lookup.events if e.tree is not None)
    figures = {"tree": views.tree_figure(drafted.tree, str, drafted.step),
               "acceptance": views.acceptance_figure(named), "lengths": views.accepted_length_figure(named),
               "timeline": views.timeline_figure(named), "kv": views.kv_heatmap(app.lookup.events[-1], "tokens")}
    for key, fig in figures.items():
        first = views.ABOUT[key].split("<br>")[0]
        assert first in fig.layout.title.text, key


# ---- item 10: the Runs tab -------------------------------------------------------------------------------------

def test_run_chips_name_the_whole_configuration():
    row = {"run_id": "0123456789abcdef", "decode": "prompt_lookup:k=4", "accept": "typical",
           "cache": "kivi:bits=2", "compress": "int4:group=32"}
    assert config_label(row) == "prompt_lookup:k=4 + accept=typical + kivi:bits=2 + int4:group=32"
    assert config_label({"decode": "plain", "accept": None, "cache": "", "compress": ""}) == "plain"


def test_comparing_runs_keeps_the_filter_count(app):
    """The comparison writes its own line; the filters' 'N of M runs shown' stays."""
    compare = next(f for f in app.demo.fns.values() if f.api_name == "compare")
    outputs = {getattr(o, "elem_id", None) for o in compare.outputs}
    assert "wb-runs-message" not in outputs and "wb-runs-compared" in outputs


def test_empty_plots_show_a_message_not_axes():
    for fig in (views.timeline_figure([]), views.acceptance_figure([]), views.accepted_length_figure([]),
                views.compare_figure([], ["tok_per_s"])):
        assert not fig.data and fig.layout.xaxis.visible is False and fig.layout.annotations[0].text


def test_compared_runs_share_colours_in_bars_and_lines(app):
    """Bars follow the selection's order, as the acceptance and timeline lines do."""
    fn = next(f for f in app.demo.fns.values() if f.api_name == "compare").fn
    ids = [app.lookup.run_id, app.plain.run_id]  # the newer run first: not the store's listing order
    bars, _, timeline, note = fn(ids)
    assert note == "comparing 2 runs"
    first_bars = [t for t in bars.data if t.showlegend]
    assert [t.name[:8] for t in first_bars] == [i[:8] for i in ids]
    assert [t.marker.color for t in first_bars] == [column_color(0), column_color(1)]
    assert [t.line.color for t in timeline.data if t.showlegend is not False] == [column_color(0), column_color(1)]
    assert "prompt_lookup:k=4" in first_bars[0].name


# ---- item 11: export --------------------------------------------------------------------------------------------

def test_export_selected_runs_as_csv_and_json(app, tmp_path):
    ids = [app.plain.run_id, app.lookup.run_id]
    with open(export_runs(app.ctx, ids, "CSV", tmp_path)) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run_id"] for r in rows) == sorted(ids) and all(r["n_new_tokens"] == "10" for r in rows)
    data = json.loads(export_runs(app.ctx, ids, "JSON", tmp_path).read_text())
    by_id = {r["run_id"]: r for r in data["runs"]}
    assert len(by_id[app.lookup.run_id]["steps"]) == len(app.lookup.events)
    assert by_id[app.plain.run_id]["decode"] == "plain"
    with pytest.raises(Exception, match="not a run id"):
        export_runs(app.ctx, ["x'; DROP TABLE runs; --"], "CSV", tmp_path)
