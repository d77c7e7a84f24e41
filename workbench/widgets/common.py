"""What the widgets share: one Workbench per model, token labels, a figure replaced in place, HTML lines."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import plotly.graph_objects as go

from workbench.api import Workbench
from workbench.spec import DEFAULT_MODEL
from workbench.trace import Trace
from workbench.views.tokens import CSS, Label, token_labeler

_workbenches: dict[str, Workbench] = {}
_lock = threading.Lock()
STYLE = f"<style>{CSS}</style>"  # the app's token colours, for HTML widgets (the token stream carries its own)


def workbench_for(model: str | None = None) -> Workbench:
    """A Workbench per model name, kept for the notebook's life so each model loads once."""
    name = model or DEFAULT_MODEL
    with _lock:
        if name not in _workbenches:
            _workbenches[name] = Workbench(name)
        return _workbenches[name]


def label_of(label: Label | Workbench | None) -> Label:
    """Token id -> text: a label function as given, a Workbench's tokenizer, or `#id` when neither is known."""
    if isinstance(label, Workbench):
        return token_labeler(label.model(label.default))
    if label is None:
        return lambda token: f"#{token}"
    return label


def upto(trace: Trace, step: int) -> Trace:
    """The trace as it stood after `step` (the views read the latest event they are given)."""
    return Trace(**{**trace.__dict__, "events": [e for e in trace.events if e.step <= step]})


def set_figure(widget: go.FigureWidget, fig: go.Figure) -> None:
    """Show `fig` in `widget` in place: one batched message, no new output. When the traces keep their
    number and types only their data change (a running race); otherwise the traces are replaced."""
    with widget.batch_update():
        same = len(widget.data) == len(fig.data) and all(a.type == b.type for a, b in zip(widget.data, fig.data))
        if same:
            for old, new in zip(widget.data, fig.data):
                old.update(new.to_plotly_json(), overwrite=True)
        else:
            widget.data = ()
            widget.add_traces(fig.data)
        widget.layout = fig.layout


def markdown_html(text: str) -> str:
    """The views' stats lines use `**bold**` (Gradio renders Markdown); an HTML widget needs tags."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)


def check_traces(traces: Any, names: list[str] | None) -> list[tuple[str, Trace | None]]:
    """(name, trace) pairs for the multi-run views, from a trace, a list of traces (None for a failed run)
    or a Race's traces."""
    if isinstance(traces, Trace) or traces is None:
        traces = [traces]
    traces = list(traces)
    if names is not None and len(names) != len(traces):
        raise ValueError(f"{len(names)} names for {len(traces)} traces: give one name per trace")
    for t in traces:
        if t is not None and not isinstance(t, Trace):
            raise TypeError(f"expected workbench Traces (Workbench.generate, race.traces), got {type(t).__name__}")
    names = names or [(t.spec.to_string() if t is not None else f"run {i + 1}") for i, t in enumerate(traces)]
    return list(zip(names, traces))


def on_change(widget: Any, callback: Callable[[], None]) -> None:
    """Call `callback` when the widget's value changes."""
    widget.observe(lambda change: callback(), names="value")
