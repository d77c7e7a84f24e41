"""AcceptanceView: acceptance per draft position beside the chain theory alpha^d, and tokens per step.

Both figures are the app's (`views.figures.acceptance_figure`, `accepted_length_figure`); every number
comes from `workbench.metrics`. `update(traces)` redraws them in place (e.g. from a running race).
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as w
import plotly.graph_objects as go

from workbench.trace import Trace
from workbench.views.figures import acceptance_figure, accepted_length_figure

from .common import check_traces, set_figure


class AcceptanceView(w.VBox):
    """`AcceptanceView(race.traces)` or `AcceptanceView([trace_a, trace_b], names=["a", "b"])`."""

    def __init__(self, traces: Trace | Sequence[Trace | None], names: list[str] | None = None):
        self.runs = check_traces(traces, names)
        self.acceptance = go.FigureWidget(acceptance_figure(self.runs))
        self.lengths = go.FigureWidget(accepted_length_figure(self.runs))
        super().__init__([self.acceptance, self.lengths])

    def update(self, traces: Trace | Sequence[Trace | None], names: list[str] | None = None) -> None:
        self.runs = check_traces(traces, names)
        set_figure(self.acceptance, acceptance_figure(self.runs))
        set_figure(self.lengths, accepted_length_figure(self.runs))
