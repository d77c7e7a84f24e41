"""RooflineView: a `workbench bench --roofline` result as the app's roofline figure (`views.roofline`).

    from workbench.widgets import RooflineView
    RooflineView("docs/results/roofline.json")
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go

from workbench.views.roofline import load_roofline, roofline_figure

from .common import set_figure


class RooflineView(w.VBox):
    """`RooflineView(path_or_result)`: the figure, and a line per engine with tok/s, GB/s and its fraction."""

    def __init__(self, result: str | Path | dict[str, Any]):
        self.figure = go.FigureWidget()
        self.table = w.HTML()
        super().__init__([self.figure, self.table])
        self.update(result)

    def update(self, result: str | Path | dict[str, Any]) -> None:
        self.result = result if isinstance(result, dict) else load_roofline(result)
        set_figure(self.figure, roofline_figure(self.result))
        self.table.value = "<br>".join(
            f"<b>{html.escape(r['engine'])}</b>: {r['tok_per_s']:.1f} tok/s, "
            f"{r['bytes_per_token'] / 1e6:.1f} MB/token, {r['achieved_gb_s']:.1f} GB/s "
            f"({r['fraction_of_bandwidth']:.0%} of the bandwidth)"
            for r in self.result["rows"])
