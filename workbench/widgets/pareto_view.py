"""ParetoView: the compression Pareto points (docs/results/pareto.json) as the app's figure (`views.pareto`).

    from workbench.widgets import ParetoView
    ParetoView("docs/results/pareto.json")
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go

from workbench.views.pareto import load_points, pareto_figure, pareto_front

from .common import set_figure


class ParetoView(w.VBox):
    """`ParetoView(path_or_points)`: the figure, and the Pareto front's points as lines of text."""

    def __init__(self, points: str | Path | list[dict[str, Any]] = "docs/results/pareto.json"):
        self.figure = go.FigureWidget()
        self.table = w.HTML()
        super().__init__([self.figure, self.table])
        self.update(points)

    def update(self, points: str | Path | list[dict[str, Any]]) -> None:
        self.points = points if isinstance(points, list) else load_points(points)
        set_figure(self.figure, pareto_figure(self.points))
        self.table.value = "Pareto front: " + "; ".join(
            f"<b>{html.escape(p['label'])}</b> {100 * p['linear_share_of_bf16']:.1f}%, ppl {p['perplexity']:.2f}"
            for p in pareto_front(self.points))
