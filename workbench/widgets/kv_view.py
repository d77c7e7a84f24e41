"""KVView: what the KV cache holds, per layer and kv head, at a chosen step.

A heatmap of bytes, sparsity, tokens held or bits per element (`views.figures.kv_heatmap`, read from the
step's cache statistics by `views.kv.kv_grid`) and, for a chosen layer and head, the prompt and output
with each token marked kept or evicted at that step (`views.tokens.kept_mask_html`).
"""

from __future__ import annotations

import ipywidgets as w
import plotly.graph_objects as go

from workbench.api import Workbench
from workbench.trace import Trace
from workbench.views.figures import kv_heatmap
from workbench.views.kv import METRICS, shape
from workbench.views.tokens import Label, kept_mask_html

from .common import STYLE, label_of, on_change, set_figure, upto


class KVView(w.VBox):
    """`KVView(trace, metric="bytes")`; sliders choose the step, layer and kv head."""

    def __init__(self, trace: Trace, label: Label | Workbench | None = None, metric: str = "bytes",
                 layer: int = 0, head: int = 0):
        if not isinstance(trace, Trace):
            raise TypeError(f"KVView shows one workbench Trace, got {type(trace).__name__}")
        if metric not in METRICS:
            raise ValueError(f"unknown KV metric {metric!r}; choose one of {', '.join(METRICS)}")
        if not trace.events:
            raise ValueError("this trace has no steps yet: run it (or wait for the race) first")
        self.trace, self.label = trace, label_of(label)
        layers, heads = shape(trace.events[-1])
        steps = [e.step for e in trace.events]
        self.metric = w.ToggleButtons(options=list(METRICS), value=metric, description="show")
        self.step = w.SelectionSlider(options=steps, value=steps[-1], description="step", continuous_update=False)
        self.layer = w.BoundedIntText(value=min(layer, layers - 1), min=0, max=layers - 1, description="layer")
        self.head = w.BoundedIntText(value=min(head, heads - 1), min=0, max=heads - 1, description="kv head")
        self.heatmap = go.FigureWidget(self.make_heatmap())
        self.mask = w.HTML(self.make_mask())
        for control in (self.metric, self.step):
            on_change(control, lambda: set_figure(self.heatmap, self.make_heatmap()))
        for control in (self.step, self.layer, self.head):
            on_change(control, lambda: setattr(self.mask, "value", self.make_mask()))
        super().__init__([w.HTML(STYLE), self.metric, self.step, self.heatmap, w.HBox([self.layer, self.head]),
                          self.mask])

    def event(self):
        return next(e for e in self.trace.events if e.step == self.step.value)

    def make_heatmap(self) -> go.Figure:
        return kv_heatmap(self.event(), self.metric.value)

    def make_mask(self) -> str:
        return kept_mask_html(upto(self.trace, self.step.value), self.label, self.layer.value,
                              self.head.value)
