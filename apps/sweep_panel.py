"""The Runs tab's sweep panel: a sweep of the store as a Pareto plot (`workbench.views.sweeps`), one point per
configuration, and a table of the same configurations. Clicking a point (or a table row) selects that
configuration's runs for comparison in the Runs tab and puts the first in "run id to open".

Plotly's clicks happen in the browser, so `SWEEP_CLICK_JS` (run once when the page loads) hands a clicked
point's run ids to a hidden textbox, whose change event does the rest in Python."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.views.replay import check_run_id
from workbench.views.runs import filter_runs, run_label
from workbench.views.sweeps import (
    SWEEPS_QUERY,
    Y_METRICS,
    configurations,
    sweep_label,
    sweep_pareto_figure,
    sweep_query,
)

from .context import AppContext

MAX_PICKED = 8  # runs of one configuration selected for comparison (the Runs tab compares at most 8)

# Attach a click handler to the sweep plot whenever plotly (re)creates it; a click writes the point's run ids
# (and a nonce, so clicking the same point again still counts as a change) into the hidden textbox.
SWEEP_CLICK_JS = """() => {
  const attach = () => document.querySelectorAll('#wb-sweep-pareto .js-plotly-plot').forEach((plot) => {
    if (plot.wbClick || !plot.on) return;
    plot.wbClick = true;
    plot.on('plotly_click', (event) => {
      const point = event && event.points && event.points[0];
      const ids = point && point.customdata && point.customdata[0];
      const box = document.querySelector('#wb-sweep-picked textarea, #wb-sweep-picked input');
      if (!ids || !box) return;
      box.value = ids + '|' + Date.now();
      box.dispatchEvent(new Event('input', {bubbles: true}));
    });
  });
  new MutationObserver(attach).observe(document.body, {childList: true, subtree: true});
}"""


@dataclass
class SweepPanel:
    sweep: gr.Dropdown
    metric: gr.Dropdown
    plot: gr.Plot
    table: gr.Dataframe
    picked: gr.Textbox  # hidden: the clicked point's run ids
    message: gr.Markdown


def build_sweep_panel() -> SweepPanel:
    with gr.Accordion("Sweeps (workbench sweep): speed against cost or quality", open=True):
        with gr.Row():
            sweep = gr.Dropdown([], label="sweep", elem_id="wb-sweep-choice", allow_custom_value=True)
            metric = gr.Dropdown(list(Y_METRICS), value="peak_cache_bytes", label="against",
                                 elem_id="wb-sweep-metric")
        message = gr.Markdown(elem_id="wb-sweep-message")
        plot = gr.Plot(label="sweep (click a point to select its runs)", elem_id="wb-sweep-pareto")
        table = gr.Dataframe(label="configurations (click a row to select its runs)", interactive=False,
                             elem_id="wb-sweep-table", max_height=240)
        picked = gr.Textbox(visible="hidden", elem_id="wb-sweep-picked")
    return SweepPanel(sweep, metric, plot, table, picked, message)


def sweep_choices(ctx: AppContext) -> list[tuple[str, str]]:
    return [(sweep_label(r), r["sweep_id"]) for r in ctx.query(SWEEPS_QUERY).to_pylist()]


def configuration_table(configs: list[dict[str, Any]], metric: str) -> pd.DataFrame:
    columns = ["configuration", "tok_per_s", metric, "cells", "run_ids"]
    frame = pd.DataFrame([{**c, "run_ids": ",".join(c["run_ids"])} for c in configs], columns=columns)
    return frame.round({"tok_per_s": 2, metric: 4})


def draw(ctx: AppContext, sweep_id: str | None, metric: str):
    """The plot, the configurations table and a line saying what they hold."""
    if not sweep_id:
        return gr.skip(), gr.skip(), "no sweep in this store yet: run `workbench sweep` (docs/sweeps.md)"
    try:
        rows = ctx.query(sweep_query(sweep_id)).to_pylist()
        configs = configurations(rows, metric)
    except WorkbenchError as err:
        return gr.skip(), gr.skip(), f"**{err}**"
    return (sweep_pareto_figure(rows, metric), configuration_table(configs, metric),
            f"{len(configs)} configurations, {sum(c['cells'] for c in configs)} finished cells")


def pick_runs(ctx: AppContext, text: str, status: str, decode: str, filtered: str):
    """The run ids of a clicked point ("id,id,...|nonce") as the Runs tab's selection, the first to open."""
    ids = [i for i in (text or "").split("|")[0].split(",") if i][:MAX_PICKED]
    try:
        ids = [check_run_id(i) for i in ids]
    except WorkbenchError as err:
        return gr.skip(), gr.skip(), f"**{err}**"
    if not ids:
        return gr.skip(), gr.skip(), gr.skip()
    listed = ", ".join(f"'{i}'" for i in ids)
    try:
        picked = ctx.query(f"SELECT * FROM run_summary WHERE run_id IN ({listed})").to_pylist()
        shown = filter_runs(ctx.query("SELECT * FROM run_summary ORDER BY created_at DESC LIMIT 500").to_pylist(),
                            status, decode, filtered)
    except WorkbenchError as err:
        return gr.skip(), gr.skip(), f"**{err}**"
    labels: dict[str, str] = {}  # the clicked runs first, then the table's, each once
    for r in [*picked, *shown]:
        labels.setdefault(r["run_id"], f"{run_label(r)} · {r['status']}")
    values = [i for i in ids if any(r["run_id"] == i for r in picked)]
    if not values:
        return gr.skip(), gr.skip(), "the runs of that point are no longer in the store"
    return (gr.update(choices=[(label, i) for i, label in labels.items()], value=values), values[0],
            f"selected {len(values)} runs of this configuration for comparison above; "
            "**Open in the views** replays the first")


def wire_sweep_panel(ctx: AppContext, panel: SweepPanel, runs: Any, triggers: list[Any]) -> None:
    """`runs`: the Runs tab (its selection, run id to open and filters); `triggers`: events that re-read the
    store's sweeps (the tab's selection, its Refresh button)."""
    common = {"concurrency_id": "store", "concurrency_limit": 4}

    def refresh(current: str | None):
        try:
            choices = sweep_choices(ctx)
        except WorkbenchError as err:
            return gr.skip(), f"**{err}**"
        ids = [value for _, value in choices]
        value = current if current in ids else (ids[0] if ids else None)
        return gr.update(choices=choices, value=value), "" if ids else "no sweep in this store yet"

    for trigger in triggers:
        trigger(refresh, inputs=panel.sweep, outputs=[panel.sweep, panel.message], api_visibility="private",
                **common)
    def redraw(sweep_id: str | None, metric: str):
        return draw(ctx, sweep_id, metric)

    drawn = [panel.plot, panel.table, panel.message]
    panel.sweep.change(redraw, inputs=[panel.sweep, panel.metric], outputs=drawn, api_name="sweep_plot", **common)
    panel.metric.change(redraw, inputs=[panel.sweep, panel.metric], outputs=drawn, api_visibility="private",
                        **common)

    filters = [runs.status, runs.decode, runs.text]
    outputs = [runs.selected, runs.open_id, panel.message]
    panel.picked.change(lambda text, *f: pick_runs(ctx, text, *f), inputs=[panel.picked, *filters], outputs=outputs,
                        api_name="sweep_pick", **common)

    def pick_row(evt: gr.SelectData, *f: str):
        row = evt.row_value if evt is not None else None
        return pick_runs(ctx, f"{row[-1]}|{time.time()}" if row else "", *f)

    panel.table.select(pick_row, inputs=filters, outputs=outputs, api_visibility="private", **common)
