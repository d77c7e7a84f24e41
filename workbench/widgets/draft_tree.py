"""DraftTreeView: one step's verified draft tree, with a slider over the steps that drafted.

The figure is the app's (`views.figures.tree_figure`): the accepted path in green, rejected nodes dimmed,
and on hover each node's draft probability q, target probability p and min(1, p/q).
"""

from __future__ import annotations

import ipywidgets as w
import plotly.graph_objects as go

from workbench.api import Workbench
from workbench.trace import Trace
from workbench.views.figures import tree_figure
from workbench.views.tokens import Label

from .common import label_of, on_change, set_figure


class DraftTreeView(w.VBox):
    """`DraftTreeView(trace)`; `label`: a Workbench or a token -> text function (default: token ids)."""

    def __init__(self, trace: Trace, label: Label | Workbench | None = None, step: int | None = None):
        if not isinstance(trace, Trace):
            raise TypeError(f"DraftTreeView shows one workbench Trace, got {type(trace).__name__}")
        self.trace, self.label = trace, label_of(label)
        drafted = [e.step for e in trace.events if e.tree is not None and e.tree.tokens]
        self.steps = drafted or [e.step for e in trace.events] or [0]  # no draft: the figure says so
        start = self.steps.index(step) if step in self.steps else 0
        self.slider = w.SelectionSlider(options=self.steps, value=self.steps[start], description="step",
                                        continuous_update=False, layout=w.Layout(width="90%"))
        self.note = w.HTML(f"{len(drafted)} of {len(trace.events)} steps drafted" if trace.events else "no steps")
        self.figure = go.FigureWidget(self.make_figure(self.slider.value))
        on_change(self.slider, lambda: set_figure(self.figure, self.make_figure(self.slider.value)))
        super().__init__([w.HBox([self.slider, self.note]), self.figure])

    def make_figure(self, step: int) -> go.Figure:
        """The figure for `step` (the view function the app draws too)."""
        event = next((e for e in self.trace.events if e.step == step), None)
        previous = next((e for e in reversed(self.trace.events) if e.step < step), None)
        root = previous.tokens[-1] if previous is not None and previous.tokens else None
        return tree_figure(event.tree if event is not None else None, self.label, step, root)
