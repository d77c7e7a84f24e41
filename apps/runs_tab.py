"""The Runs tab: the store's runs with filters, plots comparing the selected ones, and opening one in the
live views. Filters are applied here in Python, so nothing typed into them reaches SQL."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from workbench.errors import WorkbenchError
from workbench.views import figures as views
from workbench.views.replay import check_run_id, load_trace
from workbench.views.runs import filter_runs, run_label

from .context import AppContext
from .sweep_panel import SweepPanel, build_sweep_panel, wire_sweep_panel

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
    message: gr.Markdown  # how many runs the filters show
    compared: gr.Markdown  # what the comparison holds
    export_format: gr.Radio
    export: gr.Button
    export_file: gr.File
    sweeps: SweepPanel


def load_runs(ctx: AppContext) -> list[dict[str, Any]]:
    return ctx.query(f"SELECT * FROM run_summary ORDER BY created_at DESC LIMIT {LIMIT}").to_pylist()


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
        choices = _choices_of(shown, [r["run_id"] for r in shown])
        keep = [s for s in (selected or []) if any(r["run_id"] == s for r in rows)]
        return (runs_frame(shown), gr.update(choices=["all", *names]),
                gr.update(choices=choices + [c for c in _choices_of(rows, keep) if c not in choices], value=keep),
                f"{len(shown)} of {len(rows)} runs shown (newest {LIMIT} loaded)")

    return refresh


def _choices_of(rows: list[dict[str, Any]], ids: list[str]) -> list[tuple[str, str]]:
    return [(f"{run_label(r)} · {r['status']}", r["run_id"]) for r in rows if r["run_id"] in ids]


def make_compare(ctx: AppContext):
    def compare(selected: list[str] | None):
        """Run i of the selection is drawn in column_color(i) in every plot, labelled by its configuration."""
        ids = (selected or [])[:MAX_COMPARED]
        if not ids:
            empty = views.compare_figure([], COMPARED)
            return empty, views.acceptance_figure([]), views.timeline_figure([]), ""
        try:
            by_id = {r["run_id"]: r for r in load_runs(ctx) if r["run_id"] in ids}
            rows = [by_id[i] for i in ids if i in by_id]
            traces = [(run_label(r), load_trace(ctx.query, r["run_id"])) for r in rows]
        except WorkbenchError as err:
            return gr.skip(), gr.skip(), gr.skip(), f"**{err}**"
        metrics = COMPARED + [k for k in QUALITY if rows and k in rows[0]]
        return (views.compare_figure(rows, metrics, [run_label(r) for r in rows]), views.acceptance_figure(traces),
                views.timeline_figure(traces),
                f"comparing {len(rows)} runs" + (f" (the first {MAX_COMPARED})" if len(selected or []) > MAX_COMPARED
                                                  else ""))

    return compare


EXPORT_STEPS = ["step", "elapsed_ns", "draft_ns", "verify_ns", "accept_ns", "cache_bytes", "finish_reason", "text"]


def _lists_as_json(table: pa.Table) -> pa.Table:
    """CSV has no list type: list columns (acceptance per position, simulated techniques) become JSON text."""
    for i, column in enumerate(table.schema):
        if pa.types.is_list(column.type):
            values = [None if v is None else json.dumps(v) for v in table.column(i).to_pylist()]
            table = table.set_column(i, column.name, pa.array(values, pa.string()))
    return table


def export_runs(ctx: AppContext, selected: list[str] | None, fmt: str, folder: str | Path | None = None) -> Path:
    """The selected runs as a file: CSV of their `run_summary` rows, or JSON of those rows with each run's
    steps. Ids are checked as hex before they reach the (sealed, read-only) query."""
    ids = [check_run_id(i) for i in (selected or [])]
    if not ids:
        raise WorkbenchError("select runs first (click rows of the table), then export them")
    listed = ", ".join(f"'{i}'" for i in ids)
    summary = ctx.query(f"SELECT * FROM run_summary WHERE run_id IN ({listed}) ORDER BY created_at")
    folder = Path(folder or tempfile.mkdtemp(prefix="workbench-export-"))
    name = f"runs-{ids[0][:8]}" + (f"-and-{len(ids) - 1}-more" if len(ids) > 1 else "")
    if fmt == "CSV":
        path = folder / f"{name}.csv"
        pacsv.write_csv(_lists_as_json(summary), path)
        return path
    steps = ctx.query(f"SELECT run_id, {', '.join(EXPORT_STEPS)} FROM steps WHERE run_id IN ({listed}) "
                      "ORDER BY run_id, step").to_pylist()
    runs = []
    for row in summary.to_pylist():
        runs.append({**row, "steps": [{k: s[k] for k in EXPORT_STEPS} for s in steps if s["run_id"] == row["run_id"]]})
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"runs": runs}, indent=1, default=str))
    return path


def build_runs_tab() -> RunsTab:
    gr.Markdown("Runs recorded in the store, newest first. Select runs to compare them (run i has the same colour in "
                "every plot) or export them; open one to replay it in the Generate tab's views. Each plot's modebar "
                "(top right, on hover) downloads it as a PNG.")
    with gr.Row():
        status = gr.Dropdown(["all", "done", "failed", "interrupted", "running"], value="all", label="status")
        decode = gr.Dropdown(["all"], value="all", label="decoding")
        text = gr.Textbox(label="contains (id, spec, prompt or model)")
        refresh = gr.Button("Refresh", elem_id="wb-runs-refresh")
    table = gr.Dataframe(label="runs (click a row to select it)", interactive=False, wrap=False, max_height=360,
                         elem_id="wb-runs-table")
    message = gr.Markdown(elem_id="wb-runs-message")
    selected = gr.Dropdown([], value=[], multiselect=True, label="runs to compare", elem_id="wb-runs-selected")
    compared = gr.Markdown(elem_id="wb-runs-compared")
    with gr.Row():
        export_format = gr.Radio(["JSON", "CSV"], value="JSON", label="export the selected runs as",
                                 info="CSV: one summary row per run; JSON: the summaries with each run's steps")
        export = gr.Button("Export", elem_id="wb-runs-export")
        export_file = gr.File(label="exported file", elem_id="wb-runs-export-file", interactive=False)
    with gr.Row():
        open_id = gr.Textbox(label="run id to open", elem_id="wb-open-id")
        open_button = gr.Button("Open in the views", elem_id="wb-open-run")
    compare = gr.Plot(label="comparison", elem_id="wb-compare")
    with gr.Row():
        compare_acceptance = gr.Plot(label="acceptance of the selected runs")
        compare_timeline = gr.Plot(label="speed and memory of the selected runs")
    sweeps = build_sweep_panel()
    return RunsTab(status, decode, text, refresh, table, selected, compare, compare_acceptance, compare_timeline,
                   open_id, open_button, message, compared, export_format, export, export_file, sweeps)


def wire_runs_tab(ctx: AppContext, tab: RunsTab, tab_selected: Any) -> None:
    refresh = make_refresh(ctx)
    outputs = [tab.table, tab.decode, tab.selected, tab.message]
    inputs = [tab.status, tab.decode, tab.text, tab.selected]
    common = {"concurrency_id": "store", "concurrency_limit": 4}
    tab.refresh.click(refresh, inputs=inputs, outputs=outputs, api_name="runs", **common)
    wire_sweep_panel(ctx, tab.sweeps, tab, [tab.refresh.click, tab_selected])
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
                        outputs=[tab.compare, tab.compare_acceptance, tab.compare_timeline, tab.compared],
                        api_name="compare", **common)

    def export(selected: list[str] | None, fmt: str):
        try:
            return str(export_runs(ctx, selected, fmt)), gr.skip()
        except WorkbenchError as err:
            return None, f"**{err}**"

    tab.export.click(export, inputs=[tab.selected, tab.export_format], outputs=[tab.export_file, tab.compared],
                     api_name="export_runs", **common)
