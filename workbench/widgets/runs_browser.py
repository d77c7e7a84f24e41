"""RunsBrowser: the recorded runs of a store (read-only), filtered, compared, and opened in the views.

Reads through a sealed read-only `workbench.store.Reader`, so nothing here can change the store. The list,
its labels and filter are the app's Runs tab's (`views.runs`), a stored run comes back as a Trace through
`views.replay.load_trace`, and the comparison is `views.figures.compare_figure` beside the acceptance
figures. An opened run shows its text, its draft trees and its KV cache (`open_run(run_id)`). The store's
sweeps are drawn below (`SweepView`); clicking a point selects, compares and opens that configuration's runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go

from workbench.api import Workbench
from workbench.trace import Trace
from workbench.views.figures import compare_figure
from workbench.views.replay import check_run_id, load_trace
from workbench.views.runs import filter_runs, run_label
from workbench.views.tokens import Label, stats_markdown, tokens_html

from .acceptance import AcceptanceView
from .common import STYLE, label_of, markdown_html, on_change, set_figure
from .draft_tree import DraftTreeView
from .kv_view import KVView
from .sweep_view import SweepView

LIMIT = 500  # newest runs listed
METRICS = ["tok_per_s", "mean_accepted_length", "acceptance_rate", "peak_cache_bytes", "n_new_tokens"]


class RunsBrowser(w.VBox):
    """`RunsBrowser(store)`: `store` is a store file's path (default: the default store) or a Reader;
    `label` (a Workbench or token -> text) shows token text instead of ids in opened runs."""

    def __init__(self, store: str | Path | Any | None = None, label: Label | Workbench | None = None):
        from workbench.store import Reader

        self.reader = store if hasattr(store, "query") else Reader(store)
        self.label = label_of(label)
        self.status = w.Dropdown(options=["all", "done", "interrupted", "failed"], value="all", description="status")
        self.decode = w.Dropdown(options=["all"], value="all", description="decoding")
        self.text = w.Text(placeholder="id, spec, prompt or model contains...", description="search")
        self.refresh_button = w.Button(description="Refresh", icon="refresh")
        self.picked = w.SelectMultiple(options=[], rows=8, description="runs", layout=w.Layout(width="95%"))
        self.compare_button = w.Button(description="Compare selected", icon="bar-chart")
        self.open_button = w.Button(description="Open first selected", icon="folder-open")
        self.message = w.HTML()
        self.comparison = w.VBox()
        self.opened_box = w.VBox()
        self.opened: Trace | None = None
        self.compare_figure: go.FigureWidget | None = None
        self.rows: list[dict[str, Any]] = []
        self.shown: list[dict[str, Any]] = []
        for control in (self.status, self.decode, self.text):
            on_change(control, self._filter)
        self.refresh_button.on_click(lambda _: self.refresh())
        self.compare_button.on_click(lambda _: self._guard(lambda: self.compare(list(self.picked.value))))
        self.open_button.on_click(lambda _: self._guard(lambda: self.open_run(self.picked.value[0]) if self.picked.value
                                                        else self._say("select a run to open")))
        self.sweeps = SweepView(self.reader, on_pick=lambda ids: self._guard(lambda: self.pick_runs(ids)))
        super().__init__([w.HTML(STYLE), w.HBox([self.status, self.decode, self.text, self.refresh_button]),
                          self.picked, w.HBox([self.compare_button, self.open_button]), self.message,
                          self.comparison, self.opened_box, self.sweeps])
        self.refresh()

    def refresh(self) -> None:
        """Read the newest runs again."""
        self.rows = self.reader.query(f"SELECT * FROM run_summary ORDER BY created_at DESC LIMIT {LIMIT}").to_pylist()
        names = sorted({r["decode_name"] for r in self.rows if r.get("decode_name")})
        keep = self.decode.value if self.decode.value in names else "all"
        self.decode.options = ["all", *names]
        self.decode.value = keep
        self._filter()

    def pick_runs(self, run_ids: list[str]) -> None:
        """Select these runs (a sweep point's), compare them and open the first."""
        listed = ", ".join(f"'{check_run_id(i)}'" for i in run_ids)
        known = {r["run_id"] for r in self.rows}
        self.rows += [r for r in self.reader.query(f"SELECT * FROM run_summary WHERE run_id IN ({listed})").to_pylist()
                      if r["run_id"] not in known]  # older than the newest LIMIT
        self.status.value, self.decode.value, self.text.value = "all", "all", ""
        self._filter()
        self.picked.value = tuple(i for i in run_ids if i in {r["run_id"] for r in self.rows})
        self.compare(list(self.picked.value))
        self.open_run(self.picked.value[0])

    def _filter(self) -> None:
        self.shown = filter_runs(self.rows, self.status.value, self.decode.value, self.text.value)
        self.picked.options = [(run_label(r), r["run_id"]) for r in self.shown]
        self._say(f"{len(self.shown)} of {len(self.rows)} runs shown")

    def _say(self, text: str) -> None:
        self.message.value = text

    def _guard(self, action: Any) -> None:
        try:
            action()
        except Exception as err:  # shown under the buttons instead of lost in a callback
            self._say(f'<span class="wb-error">{type(err).__name__}: {err}</span>')

    def trace(self, run_id: str) -> Trace:
        """A stored run (a unique prefix of its id is enough) as a Trace."""
        return load_trace(self.reader.query, run_id)

    def compare(self, run_ids: list[str]) -> None:
        """Bars of the main metrics and the acceptance figures for the chosen runs."""
        rows = [r for r in self.rows if r["run_id"] in set(run_ids)]
        if not rows:
            self._say("select runs to compare")
            return
        names = [run_label(r) for r in rows]
        fig = compare_figure(rows, METRICS, names)
        if self.compare_figure is None:
            self.compare_figure = go.FigureWidget(fig)
        else:
            set_figure(self.compare_figure, fig)
        self.comparison.children = (self.compare_figure,
                                    AcceptanceView([self.trace(r["run_id"]) for r in rows], names))
        self._say(f"comparing {len(rows)} runs")

    def open_run(self, run_id: str) -> Trace:
        """Show one run: its text and figures line, draft trees and KV cache; returns its Trace."""
        trace = self.trace(run_id)
        self.opened = trace
        parts: list[w.Widget] = [w.HTML(f"<b>{trace.run_id[:8]} · {trace.spec.to_string() or 'decode=plain'}</b>"),
                                 w.HTML(tokens_html(trace, self.label, error=trace.error, show_prompt=True)),
                                 w.HTML(markdown_html(stats_markdown(trace, trace.status)))]
        if trace.events:
            parts += [DraftTreeView(trace, self.label), KVView(trace, self.label)]
        self.opened_box.children = tuple(parts)
        self._say(f"opened {trace.run_id[:8]}")
        return trace
