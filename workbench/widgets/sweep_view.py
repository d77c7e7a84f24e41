"""SweepView: a store's sweeps (`workbench sweep`) as the app's Pareto plot (`views.sweeps`), one point per
configuration; clicking a point hands its run ids to `on_pick` (RunsBrowser opens them in its views).

    from workbench.widgets import SweepView
    SweepView("runs.duckdb", on_pick=print)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go

from workbench.views.sweeps import SWEEPS_QUERY, Y_METRICS, sweep_label, sweep_pareto_figure, sweep_query

from .common import on_change, set_figure


class SweepView(w.VBox):
    """`SweepView(store, on_pick=None)`: `store` is a store file's path (default: the default store) or a
    Reader; `on_pick(run_ids)` is called with a clicked configuration's runs."""

    def __init__(self, store: str | Path | Any | None = None, on_pick: Callable[[list[str]], None] | None = None):
        from workbench.store import Reader

        self.reader = store if hasattr(store, "query") else Reader(store)
        self.on_pick = on_pick
        self.sweep = w.Dropdown(options=[], description="sweep", layout=w.Layout(width="60%"))
        self.metric = w.Dropdown(options=list(Y_METRICS), value="peak_cache_bytes", description="against")
        self.figure = go.FigureWidget()
        self.message = w.HTML()
        self.rows: list[dict[str, Any]] = []
        on_change(self.sweep, self.draw)
        on_change(self.metric, self.draw)
        super().__init__([w.HBox([self.sweep, self.metric]), self.message, self.figure])
        self.refresh()

    def refresh(self) -> None:
        """Read the store's sweeps again (the newest is shown first)."""
        sweeps = self.reader.query(SWEEPS_QUERY).to_pylist()
        keep = self.sweep.value
        self.sweep.options = [(sweep_label(r), r["sweep_id"]) for r in sweeps]
        ids = [r["sweep_id"] for r in sweeps]
        self.sweep.value = keep if keep in ids else (ids[0] if ids else None)
        self.draw()

    def draw(self) -> None:
        if not self.sweep.value:
            self.message.value = "no sweep in this store yet: run <code>workbench sweep</code> (docs/sweeps.md)"
            return
        self.rows = self.reader.query(sweep_query(self.sweep.value)).to_pylist()
        set_figure(self.figure, sweep_pareto_figure(self.rows, self.metric.value))
        for trace in self.figure.data:
            if trace.customdata is not None:
                trace.on_click(self._clicked)
        self.message.value = f"{len(self.rows)} finished cells; click a point to open its runs"

    def _clicked(self, trace: Any, points: Any, _state: Any) -> None:
        if points.point_inds:
            self.pick(trace.customdata[points.point_inds[0]][0].split(","))

    def pick(self, run_ids: list[str]) -> None:
        """What a click on a point does: hand its run ids to `on_pick`."""
        self.message.value = f"picked {len(run_ids)} runs"
        if self.on_pick is not None:
            self.on_pick(run_ids)
