"""Plotly figures of runs: pure functions of StepEvents and Traces (no Gradio, no engine).

Every number comes from the events or from `workbench.metrics`; the only things computed here are layout
and the theory curve alpha^d beside measured acceptance (alpha itself comes from the metrics). Each figure
says what it shows in its subtitle (`ABOUT`), names its series on hover, draws column i in `column_color(i)`
wherever it appears, and has a transparent background (the app's CSS themes its text for dark mode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.engine import StepEvent, TreeRecord
from workbench.metrics import acceptance_per_position, chain_acceptance
from workbench.trace import Trace

from .kv import kv_grid
from .palette import column_color

Label = Callable[[int], str]  # token id -> its text
ACCEPTED, REJECTED, ROOT = "#16a34a", "#9ca3af", "#1f2937"
# (column label, trace) per column, in column order; a column without a trace (a failed spec) is None, so
# the others keep their colours
Named = Sequence[tuple[str, Trace | None]]
ABOUT = {  # what each view shows, as its subtitle (short lines: plot titles do not wrap)
    "tree": "one step's verified draft: green is the accepted path;<br>hover a node for q, p and min(1, p/q)",
    "acceptance": "solid: share of drafts reaching depth d accepted there;<br>dashed: the chain theory alpha^d",
    "lengths": "tokens each target forward committed<br>(accepted drafts + the target's own token)",
    "timeline": "tokens per second so far, and KV-cache MiB held,<br>over each run's own time",
    "kv": "one cell per layer and kv head, at the chosen step",
    "compare": "one bar per selected run, per metric",
}
BITS_NOTE = ("mean bits per K/V element held, scales included; KIVI keeps its newest<br>tokens in a "
             "full-precision residual window until a group fills, so the<br>mean lies between the code width "
             "and the model's dtype (16 for bf16)")


def _style(fig: go.Figure, title: str, about: str = "", **layout: Any) -> go.Figure:
    """The common look: title with the view's explanation under it, transparent background, full series
    names on hover."""
    text = title + "".join(f"<br><sup>{line}</sup>" for line in about.split("<br>") if line)
    fig.update_layout(title={"text": text, "font": {"size": 15}}, paper_bgcolor="rgba(0,0,0,0)",
                      plot_bgcolor="rgba(0,0,0,0)", template="plotly_white", hoverlabel={"namelength": -1},
                      **layout)
    return fig


def _empty(title: str, message: str) -> go.Figure:
    """A figure with no axes, only a message saying why it is empty."""
    fig = go.Figure()
    return _style(fig, title, xaxis={"visible": False}, yaxis={"visible": False}, height=300,
                  margin={"l": 20, "r": 20, "t": 50, "b": 20},
                  annotations=[{"text": message, "showarrow": False, "font": {"size": 14}, "xref": "paper",
                                "yref": "paper", "x": 0.5, "y": 0.5}])


def _present(runs: Named) -> list[tuple[int, str, Trace]]:
    """(column index, label, trace) of the columns that have a trace with events."""
    return [(i, name, trace) for i, (name, trace) in enumerate(runs) if trace is not None and trace.events]


def _fmt(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3f}"


def tree_layout(parents: list[int]) -> list[float]:
    """A vertical slot per node: leaves take consecutive slots, a parent sits at the mean of its children."""
    children: dict[int, list[int]] = {-1: []}
    for i, p in enumerate(parents):
        children.setdefault(p, []).append(i)
    y: dict[int, float] = {}
    next_leaf = [0.0]

    def place(node: int) -> float:
        kids = children.get(node, [])
        if not kids:
            y[node] = next_leaf[0]
            next_leaf[0] += 1
        else:
            y[node] = sum(place(k) for k in kids) / len(kids)
        return y[node]

    place(-1)
    return [y[-1]] + [y[i] for i in range(len(parents))]  # the root first


def tree_figure(tree: TreeRecord | None, label: Label, step: int, root_token: int | None = None,
                title: str = "") -> go.Figure:
    """The verified draft tree of one step: accepted path in green, rejected nodes dimmed; hover p and q."""
    title = title or f"draft tree, step {step}"
    if tree is None or not tree.tokens:
        return _empty(title, "no draft at this step (plain decoding, the prefill, or an empty draft)")
    ys = tree_layout(tree.parents)
    xs = [0] + list(tree.depths)
    fig = go.Figure()
    for accepted in (False, True):  # rejected edges first, so the accepted path is drawn on top
        ex: list[float | None] = []
        ey: list[float | None] = []
        for i, p in enumerate(tree.parents):
            if tree.accepted[i] == accepted:
                ex += [xs[p + 1], xs[i + 1], None]
                ey += [ys[p + 1], ys[i + 1], None]
        fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", hoverinfo="skip", showlegend=False,
                                 line={"color": ACCEPTED if accepted else REJECTED, "width": 4 if accepted else 1},
                                 opacity=1.0 if accepted else 0.5))
    hover, text, colors, sizes = [], [], [], []
    root_text = label(root_token) if root_token is not None else "pending token"
    hover.append(f"root (pending token): {root_text!r}")
    text.append(root_text)
    colors.append(ROOT)
    sizes.append(16)
    for i, token in enumerate(tree.tokens):
        q, p = tree.draft_probs[i], tree.target_probs[i]
        ratio = "n/a (no draft distribution)" if q is None else _fmt(min(1.0, p / q) if q > 0 else 1.0)
        hover.append(f"node {i}: {label(token)!r} (id {token}), depth {tree.depths[i]}<br>"
                     f"draft prob q = {_fmt(q)}<br>target prob p = {_fmt(p)}<br>min(1, p/q) = {ratio}<br>"
                     f"{'accepted' if tree.accepted[i] else 'rejected'}")
        text.append(label(token))
        colors.append(ACCEPTED if tree.accepted[i] else REJECTED)
        sizes.append(14 if tree.accepted[i] else 10)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", text=text, textposition="top center",
                             hovertext=hover, hoverinfo="text", showlegend=False,
                             marker={"color": colors, "size": sizes, "line": {"width": 1, "color": "white"}}))
    n_acc = sum(tree.accepted)
    return _style(fig, f"{title}: {n_acc} of {len(tree.tokens)} drafted tokens accepted", ABOUT["tree"],
                  height=360, xaxis={"title": "depth", "dtick": 1}, yaxis={"visible": False},
                  margin={"l": 20, "r": 20, "t": 60, "b": 40})


def acceptance_figure(runs: Named) -> go.Figure:
    """Measured acceptance per draft position, with the chain theory alpha^d (Leviathan et al.) where alpha
    is known; the theory line's name compares measured tokens per drafting step with
    (1 - alpha^(k+1)) / (1 - alpha). The names carry the per-run figures, so the title stays one line
    however many columns there are."""
    title = "acceptance per draft position"
    fig = go.Figure()
    for i, name, trace in _present(runs):
        measured = acceptance_per_position(trace)
        if not measured:
            continue
        color = column_color(i)
        depths = list(range(1, len(measured) + 1))
        fig.add_trace(go.Scatter(x=depths, y=measured, mode="lines+markers", name=f"{name} measured",
                                 line={"color": color}, legendgroup=name,
                                 hovertemplate="depth %{x}: %{y:.2f} accepted<extra>%{fullData.name}</extra>"))
        chain = chain_acceptance(trace)
        if chain["alpha"] is not None:
            alpha = chain["alpha"]
            fig.add_trace(go.Scatter(
                x=depths, y=[alpha ** d for d in depths], mode="lines", legendgroup=name,
                name=f"{name} theory alpha^d (alpha {alpha:.2f}: {chain['tokens_per_step']:.2f} tokens/step "
                     f"measured, {chain['predicted_tokens_per_step']:.2f} predicted)",
                line={"color": color, "dash": "dash"},
                hovertemplate="depth %{x}: %{y:.2f} predicted<extra>%{fullData.name}</extra>"))
    if not fig.data:
        return _empty(title, "no drafted tokens yet (plain decoding drafts nothing)")
    return _style(fig, title, ABOUT["acceptance"], height=360,
                  xaxis={"title": "draft position (depth)", "dtick": 1},
                  yaxis={"title": "fraction accepted", "range": [0, 1.05]},
                  margin={"l": 50, "r": 20, "t": 60, "b": 40}, legend={"orientation": "h", "y": -0.25})


def accepted_length_figure(runs: Named) -> go.Figure:
    """Histogram of tokens committed per decoding step (accepted drafts + the target's own token)."""
    title = "tokens per step"
    fig = go.Figure()
    for i, name, trace in _present(runs):
        lengths = [len(e.tokens) for e in trace.events if e.step > 0]
        if lengths:
            fig.add_trace(go.Histogram(x=lengths, name=name, marker={"color": column_color(i)}, xbins={"size": 1},
                                       opacity=0.7, hovertemplate="%{x} tokens: %{y} steps<extra>%{fullData.name}"
                                                                  "</extra>"))
    if not fig.data:
        return _empty(title, "no decoding steps yet")
    return _style(fig, title, ABOUT["lengths"], barmode="overlay", height=320, xaxis={"title": "tokens", "dtick": 1},
                  yaxis={"title": "steps"}, margin={"l": 50, "r": 20, "t": 60, "b": 40})


def timeline_figure(runs: Named) -> go.Figure:
    """Tok/s so far and KV-cache bytes held, over each run's own time."""
    title = "speed and memory"
    present = _present(runs)
    if not present:
        return _empty(title, "no steps yet: run a configuration or select runs")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("tok/s so far", "KV cache MiB held"))
    for i, name, trace in present:
        t = [e.elapsed_ns / 1e9 for e in trace.events]
        total = 0
        rate = []
        for e, s in zip(trace.events, t):
            total += len(e.tokens)
            rate.append(total / s if s > 0 else 0.0)
        color = column_color(i)
        fig.add_trace(go.Scatter(x=t, y=rate, name=name, mode="lines", line={"color": color}, legendgroup=name,
                                 hovertemplate="%{x:.2f} s: %{y:.1f} tok/s<extra>%{fullData.name}</extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=t, y=[e.cache_bytes / 2**20 for e in trace.events], name=f"{name} KV",
                                 mode="lines", line={"color": color, "dash": "dot"}, showlegend=False,
                                 legendgroup=name,
                                 hovertemplate="%{x:.2f} s: %{y:.2f} MiB<extra>%{fullData.name}</extra>"),
                      row=1, col=2)
    fig.update_xaxes(title_text="seconds of the run's own time")
    return _style(fig, title, ABOUT["timeline"], height=340, margin={"l": 50, "r": 20, "t": 80, "b": 40},
                  legend={"orientation": "h", "y": -0.3})


def kv_heatmap(event: StepEvent | None, metric: str, title: str = "") -> go.Figure:
    """Layer x head heatmap of `metric` (bytes, sparsity, tokens or bits) at one step. When every cell holds
    the same value the colour scale would say nothing, so the title says the value instead."""
    title = title or f"KV cache {metric}"
    grid = kv_grid(event, metric) if event is not None else None
    if grid is None:
        return _empty(title, f"no {metric} reported for this step")
    z, note = grid
    values = [v for row in z for v in row if v is not None]
    uniform = bool(values) and min(values) == max(values)
    notes = [n for n in (note, BITS_NOTE if metric == "bits" else "") if n]
    if uniform:
        notes.insert(0, f"uniform: all {len(values)} cells are {values[0]:.4g}")
    fig = go.Figure(go.Heatmap(z=z, colorscale="Viridis", colorbar={"title": metric}, showscale=not uniform,
                               hovertemplate="layer %{y}, head %{x}: %{z}<extra>" + metric + "</extra>"))
    about = "<br>".join([ABOUT["kv"], *notes])
    lines = about.count("<br>") + 1
    return _style(fig, f"{title} (step {event.step})", about, height=320 + 14 * lines,
                  xaxis={"title": "kv head", "dtick": 1},
                  yaxis={"title": "layer", "dtick": 1 if len(z) <= 12 else None},
                  margin={"l": 50, "r": 20, "t": 50 + 14 * lines, "b": 40})


def compare_figure(rows: list[dict[str, Any]], metrics: Sequence[str],
                   names: Sequence[str] | None = None) -> go.Figure:
    """Bars of each metric for the selected runs (rows of `run_summary`), run i in `column_color(i)`;
    `names` label the runs (default: the id's start)."""
    shown = [m for m in metrics if any(r.get(m) is not None for r in rows)]
    if not rows or not shown:
        return _empty("compare runs", "select runs in the table (or type their ids) to compare them")
    fig = make_subplots(rows=1, cols=len(shown), subplot_titles=shown)
    names = list(names) if names is not None else [r["run_id"][:6] for r in rows]
    for j, metric in enumerate(shown, start=1):
        for i, (name, r) in enumerate(zip(names, rows)):
            fig.add_trace(go.Bar(x=[name], y=[r.get(metric)], name=name, showlegend=j == 1, legendgroup=name,
                                 marker={"color": column_color(i)},
                                 hovertemplate=metric + ": %{y}<extra>%{fullData.name}</extra>"), row=1, col=j)
    fig.update_xaxes(showticklabels=False)
    return _style(fig, "compare runs", ABOUT["compare"], height=380, margin={"l": 40, "r": 20, "t": 80, "b": 40},
                  legend={"orientation": "h", "y": -0.1})


def sql_figure(columns: list[str], data: dict[str, list]) -> go.Figure | None:
    """A scatter (a line when x is sorted) of the first two numeric columns of a query result, else None."""
    numeric = [c for c in columns if data[c] and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                      for v in data[c] if v is not None)
               and any(v is not None for v in data[c])]
    if len(numeric) < 2:
        return None
    x, y = data[numeric[0]], data[numeric[1]]
    ordered = all(a is not None and b is not None and a <= b for a, b in zip(x, x[1:]))
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines+markers" if ordered else "markers"))
    return _style(fig, f"{numeric[1]} against {numeric[0]}", xaxis={"title": numeric[0]},
                  yaxis={"title": numeric[1]}, height=340, margin={"l": 50, "r": 20, "t": 40, "b": 40})
