"""The compression Pareto view: weight bytes against perplexity, one point per transform or searched plan.

A pure function of the points `scripts/compression_pareto.py` writes to docs/results/pareto.json (label,
chain, search, linear_share_of_bf16, perplexity); plain transforms are circles, searched plans stars, and
the points no other point beats on both axes are joined (the Pareto front).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from .palette import column_color

ABOUT = "decoder linear bytes (% of bf16) against perplexity;<br>stars: per-layer plans searched at a bit budget"


def pareto_front(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both bytes and perplexity, by increasing bytes."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p["linear_share_of_bf16"], p["perplexity"])):
        if p["perplexity"] < best:
            front.append(p)
            best = p["perplexity"]
    return front


def pareto_figure(points: Sequence[dict[str, Any]]) -> go.Figure:
    """Scatter of the points (log perplexity), with the Pareto front as a line."""
    fig = go.Figure()
    for i, searched in enumerate((False, True)):
        chosen = [p for p in points if bool(p.get("search")) == searched]
        fig.add_trace(go.Scatter(
            x=[100 * p["linear_share_of_bf16"] for p in chosen], y=[p["perplexity"] for p in chosen],
            mode="markers+text", text=[p["label"] for p in chosen], textposition="top center",
            name="searched plans" if searched else "transforms",
            marker={"symbol": "star" if searched else "circle", "size": 14 if searched else 9,
                    "color": column_color(i)},
            hovertemplate="%{text}<br>%{x:.1f}% of bf16 bytes<br>perplexity %{y:.3f}<extra></extra>"))
    front = pareto_front(points)
    fig.add_trace(go.Scatter(x=[100 * p["linear_share_of_bf16"] for p in front], y=[p["perplexity"] for p in front],
                             mode="lines", name="Pareto front", line={"dash": "dot", "color": "#6b7280"},
                             hoverinfo="skip"))
    fig.update_layout(title={"text": f"Bytes against perplexity<br><sub>{ABOUT}</sub>"},
                      xaxis_title="decoder linear weight bytes, % of bf16", yaxis_title="perplexity",
                      yaxis_type="log", paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)")
    return fig


def load_points(path: str | Path = "docs/results/pareto.json") -> list[dict[str, Any]]:
    """The points of a pareto.json results file."""
    return json.loads(Path(path).read_text())["points"]
