"""The Benchmarks tab: the roofline results of `workbench bench --roofline` (docs/performance.md), drawn by the
views' roofline figure. Only result files in the project's `docs/results/` folder are offered (by name, from a
list): the browser never names a path on the server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.views.pareto import load_points, pareto_figure
from workbench.views.roofline import load_roofline, roofline_figure

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
COLUMNS = {"engine": "engine", "tok_per_s": "tok/s", "bytes_per_token": "MB/token", "achieved_gb_s": "GB/s",
           "fraction_of_bandwidth": "of bandwidth", "ms_per_token": "ms/token", "ms_not_reading": "ms not reading"}


@dataclass
class BenchTab:
    result: gr.Dropdown
    message: gr.Markdown
    plot: gr.Plot
    table: gr.Dataframe
    pareto: gr.Plot


def roofline_files() -> list[str]:
    return sorted(p.name for p in RESULTS.glob("roofline*.json"))


def show_roofline(name: str | None):
    """(figure, table, message) for the result file `name` of the results folder."""
    if not name or name not in roofline_files():
        return roofline_figure(None), pd.DataFrame(), "pick a result (make one with `workbench bench --roofline`)"
    try:
        result = load_roofline(RESULTS / name)
    except WorkbenchError as err:
        return roofline_figure(None), pd.DataFrame(), f"**{err}**"
    rows = pd.DataFrame([{label: r[key] for key, label in COLUMNS.items()} for r in result["rows"]])
    rows["MB/token"] = rows["MB/token"] / 1e6
    band = result["bandwidth"]["main_memory"]
    note = (f"{result['model']}, {result['prompts']} prompts x {result['repeats']}, {result['max_new_tokens']} new "
            f"tokens; read bandwidth {band['median_gb_s']:.1f} GB/s (median, {band['low_gb_s']:.1f}-"
            f"{band['high_gb_s']:.1f})")
    return roofline_figure(result), rows.round(3), note


def show_pareto():
    """The compression Pareto figure of docs/results/pareto.json (empty until scripts/compression_pareto.py ran)."""
    path = RESULTS / "pareto.json"
    return pareto_figure(load_points(path) if path.is_file() else [])


def build_bench_tab() -> BenchTab:
    gr.Markdown("Plain decoding in each weight format against the machine's read bandwidth, measured in the same "
                "run: `workbench bench --roofline --json docs/results/roofline.json` (docs/performance.md).")
    files = roofline_files()
    result = gr.Dropdown(files, value=files[0] if files else None, label="roofline result", elem_id="wb-bench-file")
    message = gr.Markdown(elem_id="wb-bench-message")
    plot = gr.Plot(elem_id="wb-bench-plot")
    table = gr.Dataframe(interactive=False, elem_id="wb-bench-table")
    gr.Markdown("Weight bytes against perplexity for every weight transform and the searched per-layer plans: "
                "`scripts/compression_pareto.py` (docs/compression.md).")
    pareto = gr.Plot(elem_id="wb-bench-pareto")
    return BenchTab(result, message, plot, table, pareto)


def wire_bench_tab(tab: BenchTab, selected) -> None:
    """`selected`: the tab's select event, which (re)loads the chosen file."""
    outputs = [tab.plot, tab.table, tab.message]
    tab.result.change(show_roofline, inputs=tab.result, outputs=outputs, api_name="roofline")
    selected(show_roofline, inputs=tab.result, outputs=outputs, api_visibility="private")
    selected(show_pareto, outputs=tab.pareto, api_visibility="private")
