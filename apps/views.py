"""Plotly figures of runs: pure functions of StepEvents and Traces (no Gradio, no engine).

Every number comes from the events or from `workbench.metrics`; the only things computed here are layout
and the theory curve alpha^d beside measured acceptance (alpha itself comes from the metrics).
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

Label = Callable[[int], str]  # token id -> its text
COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706"]  # one per configuration column
ACCEPTED, REJECTED, ROOT = "#16a34a", "#9ca3af", "#1f2937"
Named = Sequence[tuple[str, Trace]]  # (column label, trace)


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, xaxis={"visible": False}, yaxis={"visible": False}, height=300,
                      margin={"l": 20, "r": 20, "t": 40, "b": 20},
                      annotations=[{"text": message, "showarrow": False, "font": {"size": 14}}])
    return fig


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
    fig.update_layout(title=f"{title}: {n_acc} of {len(tree.tokens)} drafted tokens accepted", height=360,
                      xaxis={"title": "depth", "dtick": 1}, yaxis={"visible": False},
                      margin={"l": 20, "r": 20, "t": 50, "b": 40})
    return fig


def acceptance_figure(runs: Named) -> go.Figure:
    """Measured acceptance per draft position, with the chain theory alpha^d (Leviathan et al.) where alpha
    is known; the title compares measured tokens per drafting step with (1 - alpha^(k+1)) / (1 - alpha)."""
    title = "acceptance per draft position"
    fig = go.Figure()
    notes = []
    for i, (name, trace) in enumerate(runs):
        measured = acceptance_per_position(trace)
        if not measured:
            continue
        color = COLORS[i % len(COLORS)]
        depths = list(range(1, len(measured) + 1))
        fig.add_trace(go.Scatter(x=depths, y=measured, mode="lines+markers", name=f"{name} measured",
                                 line={"color": color}))
        chain = chain_acceptance(trace)
        if chain["alpha"] is not None:
            alpha = chain["alpha"]
            fig.add_trace(go.Scatter(x=depths, y=[alpha ** d for d in depths], mode="lines",
                                     name=f"{name} theory alpha^d", line={"color": color, "dash": "dash"}))
            notes.append(f"{name}: alpha={alpha:.2f}, tokens/step {chain['tokens_per_step']:.2f} measured vs "
                         f"{chain['predicted_tokens_per_step']:.2f} predicted")
    if not fig.data:
        return _empty(title, "no drafted tokens yet (plain decoding drafts nothing)")
    fig.update_layout(title=title + ("<br><sup>" + "; ".join(notes) + "</sup>" if notes else ""), height=340,
                      xaxis={"title": "draft position (depth)", "dtick": 1},
                      yaxis={"title": "fraction of steps accepting it", "range": [0, 1.05]},
                      margin={"l": 50, "r": 20, "t": 60, "b": 40}, legend={"orientation": "h", "y": -0.25})
    return fig


def accepted_length_figure(runs: Named) -> go.Figure:
    """Histogram of tokens committed per decoding step (accepted drafts + the bonus token)."""
    title = "tokens per step (accepted + bonus)"
    fig = go.Figure()
    for i, (name, trace) in enumerate(runs):
        lengths = [len(e.tokens) for e in trace.events if e.step > 0]
        if lengths:
            fig.add_trace(go.Histogram(x=lengths, name=name, marker={"color": COLORS[i % len(COLORS)]},
                                       xbins={"size": 1}, opacity=0.7))
    if not fig.data:
        return _empty(title, "no decoding steps yet")
    fig.update_layout(title=title, barmode="overlay", height=300, xaxis={"title": "tokens", "dtick": 1},
                      yaxis={"title": "steps"}, margin={"l": 50, "r": 20, "t": 40, "b": 40})
    return fig


def timeline_figure(runs: Named) -> go.Figure:
    """Tok/s so far and KV-cache bytes held, over each run's own time."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("tok/s so far", "KV cache MiB held"))
    for i, (name, trace) in enumerate(runs):
        if not trace.events:
            continue
        t = [e.elapsed_ns / 1e9 for e in trace.events]
        total = 0
        rate = []
        for e, s in zip(trace.events, t):
            total += len(e.tokens)
            rate.append(total / s if s > 0 else 0.0)
        color = COLORS[i % len(COLORS)]
        fig.add_trace(go.Scatter(x=t, y=rate, name=name, mode="lines", line={"color": color}), row=1, col=1)
        fig.add_trace(go.Scatter(x=t, y=[e.cache_bytes / 2**20 for e in trace.events], name=f"{name} KV",
                                 mode="lines", line={"color": color, "dash": "dot"}, showlegend=False),
                      row=1, col=2)
    fig.update_xaxes(title_text="seconds of the run's own time")
    fig.update_layout(height=300, margin={"l": 50, "r": 20, "t": 40, "b": 40}, legend={"orientation": "h", "y": -0.3})
    return fig


def kv_heatmap(event: StepEvent | None, metric: str, title: str = "") -> go.Figure:
    """Layer x head heatmap of `metric` (bytes, sparsity, tokens or bits) at one step."""
    title = title or f"KV cache {metric}"
    grid = kv_grid(event, metric) if event is not None else None
    if grid is None:
        return _empty(title, f"no {metric} reported for this step")
    z, note = grid
    fig = go.Figure(go.Heatmap(z=z, colorscale="Viridis", colorbar={"title": metric},
                               hovertemplate="layer %{y}, head %{x}: %{z}<extra></extra>"))
    fig.update_layout(title=f"{title} (step {event.step}){'<br><sup>' + note + '</sup>' if note else ''}",
                      height=340, xaxis={"title": "kv head", "dtick": 1},
                      yaxis={"title": "layer", "dtick": 1 if len(z) <= 12 else None},
                      margin={"l": 50, "r": 20, "t": 60, "b": 40})
    return fig


def compare_figure(rows: list[dict[str, Any]], metrics: Sequence[str]) -> go.Figure:
    """Bars of each metric for the selected runs (rows of `run_summary`)."""
    shown = [m for m in metrics if any(r.get(m) is not None for r in rows)]
    if not rows or not shown:
        return _empty("compare runs", "select runs in the table (or type their ids) to compare them")
    fig = make_subplots(rows=1, cols=len(shown), subplot_titles=shown)
    names = [f"{r['run_id'][:6]} {r.get('decode') or ''}" for r in rows]
    for j, metric in enumerate(shown, start=1):
        fig.add_trace(go.Bar(x=names, y=[r.get(metric) for r in rows], showlegend=False,
                             marker={"color": [COLORS[i % len(COLORS)] for i in range(len(rows))]}), row=1, col=j)
    fig.update_layout(height=340, margin={"l": 40, "r": 20, "t": 40, "b": 80})
    return fig


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
    fig.update_layout(title=f"{numeric[1]} against {numeric[0]}", xaxis={"title": numeric[0]},
                      yaxis={"title": numeric[1]}, height=340, margin={"l": 50, "r": 20, "t": 40, "b": 40})
    return fig
