"""The Runs tab: the store's runs with filters, plots comparing the selected ones, and opening one in the
live views. Filters are applied here in Python, so nothing typed into them reaches SQL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from workbench.errors import WorkbenchError

from . import views
from .context import AppContext
from .replay import check_run_id, load_trace

LIMIT = 500  # newest runs listed
COLUMNS = ["run_id", "created_at", "status", "decode", "accept", "cache", "compress", "temperature", "tok_per_s",
           "mean_accepted_length", "acceptance_rate", "peak_cache_bytes", "n_new_tokens", "lossless", "model",
           "prompt"]
COMPARED = ["tok_per_s", "mean_accepted_length", "acceptance_rate", "peak_cache_bytes", "weight_bytes"]
QUALITY = ("perplexity", "kl", "quality")  # compared too when the store has them
MAX_COMPARED = 8


@dataclass
class RunsTab:
    status: gr.Dropdown
    decode: gr.Dropdown
    text: gr.Textbox
    refresh: gr.Button
    table: gr.Dataframe
    selected: gr.Dropdown
    compare: gr.Plot
    compare_acceptance: gr.Plot
    compare_timeline: gr.Plot
    open_id: gr.Textbox
    open: gr.Button
    message: gr.Markdown


def load_runs(ctx: AppContext) -> list[dict[str, Any]]:
    return ctx.query(f"SELECT * FROM run_summary ORDER BY created_at DESC LIMIT {LIMIT}").to_pylist()


def filter_runs(rows: list[dict[str, Any]], status: str, decode: str, text: str) -> list[dict[str, Any]]:
    text = (text or "").strip().lower()
    out = []
    for r in rows:
        if status not in (None, "", "all") and r["status"] != status:
            continue
        if decode not in (None, "", "all") and r["decode_name"] != decode:
            continue
        if text and not any(text in str(r.get(k) or "").lower() for k in ("run_id", "spec", "prompt", "model")):
            continue
        out.append(r)
    return out


def runs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame([{k: r.get(k) for k in COLUMNS} for r in rows], columns=COLUMNS)
    frame["prompt"] = frame["prompt"].astype(str).str.slice(0, 60)
    frame["created_at"] = frame["created_at"].astype(str).str.slice(0, 19)
    for k in ("tok_per_s", "mean_accepted_length", "acceptance_rate"):
        frame[k] = frame[k].astype(float).round(3)
    return frame


def make_refresh(ctx: AppContext):
    def refresh(status: str, decode: str, text: str, selected: list[str] | None):
        try:
            rows = load_runs(ctx)
        except WorkbenchError as err:
            return gr.skip(), gr.skip(), gr.skip(), f"**{err}**"
        shown = filter_runs(rows, status, decode, text)
        names = sorted({r["decode_name"] for r in rows if r["decode_name"]})
        choices = [(f"{r['run_id'][:8]} · {r['decode'] or ''} · {r['status']}", r["run_id"]) for r in shown]
        keep = [s for s in (selected or []) if any(r["run_id"] == s for r in rows)]
        return (runs_frame(shown), gr.update(choices=["all", *names]),
                gr.update(choices=choices + [c for c in _choices_of(rows, keep) if c not in choices], value=keep),
                f"{len(shown)} of {len(rows)} runs shown (newest {LIMIT} loaded)")

    return refresh


def _choices_of(rows: list[dict[str, Any]], ids: list[str]) -> list[tuple[str, str]]:
    return [(f"{r['run_id'][:8]} · {r['decode'] or ''} · {r['status']}", r["run_id"]) for r in rows
            if r["run_id"] in ids]


def make_compare(ctx: AppContext):
    def compare(selected: list[str] | None):
        ids = (selected or [])[:MAX_COMPARED]
        if not ids:
            empty = views.compare_figure([], COMPARED)
            return empty, views.acceptance_figure([]), views.timeline_figure([]), gr.skip()
        try:
            rows = [r for r in load_runs(ctx) if r["run_id"] in ids]
            traces = [(f"{t.run_id[:6]} {t.spec.decode.name}", t) for t in (load_trace(ctx.query, i) for i in ids)]
        except WorkbenchError as err:
            return gr.skip(), gr.skip(), gr.skip(), f"**{err}**"
        metrics = COMPARED + [k for k in QUALITY if rows and k in rows[0]]
        return (views.compare_figure(rows, metrics), views.acceptance_figure(traces), views.timeline_figure(traces),
                f"comparing {len(rows)} runs" + (f" (the first {MAX_COMPARED})" if len(selected or []) > MAX_COMPARED
                                                  else ""))

    return compare


def build_runs_tab() -> RunsTab:
    gr.Markdown("Runs recorded in the store, newest first. Select runs to compare them; open one to replay it in "
                "the Generate tab's views.")
    with gr.Row():
        status = gr.Dropdown(["all", "done", "failed", "interrupted", "running"], value="all", label="status")
        decode = gr.Dropdown(["all"], value="all", label="decoding")
        text = gr.Textbox(label="contains (id, spec, prompt or model)")
        refresh = gr.Button("Refresh", elem_id="wb-runs-refresh")
    table = gr.Dataframe(label="runs (click a row to select it)", interactive=False, wrap=False, max_height=360,
                         elem_id="wb-runs-table")
    message = gr.Markdown(elem_id="wb-runs-message")
    selected = gr.Dropdown([], value=[], multiselect=True, label="runs to compare", elem_id="wb-runs-selected")
    with gr.Row():
        open_id = gr.Textbox(label="run id to open", elem_id="wb-open-id")
        open_button = gr.Button("Open in the views", elem_id="wb-open-run")
    compare = gr.Plot(label="comparison", elem_id="wb-compare")
    with gr.Row():
        compare_acceptance = gr.Plot(label="acceptance of the selected runs")
        compare_timeline = gr.Plot(label="speed and memory of the selected runs")
    return RunsTab(status, decode, text, refresh, table, selected, compare, compare_acceptance, compare_timeline,
                   open_id, open_button, message)


def wire_runs_tab(ctx: AppContext, tab: RunsTab, tab_selected: Any) -> None:
    refresh = make_refresh(ctx)
    outputs = [tab.table, tab.decode, tab.selected, tab.message]
    inputs = [tab.status, tab.decode, tab.text, tab.selected]
    common = {"concurrency_id": "store", "concurrency_limit": 4}
    tab.refresh.click(refresh, inputs=inputs, outputs=outputs, api_name="runs", **common)
    for trigger in (tab.status.input, tab.decode.input, tab.text.submit, tab_selected):
        trigger(refresh, inputs=inputs, outputs=outputs, api_visibility="private", **common)

    def pick(selected: list[str] | None, evt: gr.SelectData):
        row = evt.row_value if evt is not None else None
        if not row:
            return gr.skip(), gr.skip()
        run_id = str(row[0])
        try:
            check_run_id(run_id)
        except WorkbenchError:
            return gr.skip(), gr.skip()
        chosen = list(selected or [])
        if run_id not in chosen:
            chosen.append(run_id)
        return gr.update(value=chosen), run_id

    tab.table.select(pick, inputs=tab.selected, outputs=[tab.selected, tab.open_id], api_visibility="private",
                     **common)
    tab.selected.change(make_compare(ctx), inputs=tab.selected,
                        outputs=[tab.compare, tab.compare_acceptance, tab.compare_timeline, tab.message],
                        api_name="compare", **common)
