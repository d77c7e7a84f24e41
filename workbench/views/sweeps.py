"""A sweep as a Pareto plot: one point per configuration (its cells' mean speed against a cost or quality
metric), the configurations no other beats on both axes joined as the front. Each point carries its
configuration's run ids (`customdata`), so a surface can open them in the run views."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from workbench.errors import WorkbenchError

from .palette import column_color

# metric -> whether lower is better (speed is always "higher is better", on x)
Y_METRICS = {"peak_cache_bytes": True, "weight_bytes": True, "mean_accepted_length": False}


def sweep_query(sweep_id: str) -> str:
    """The rows `sweep_pareto_figure` takes, as one query a sealed Reader runs (the id is checked as hex)."""
    if not re.fullmatch(r"[0-9a-f]{1,64}", sweep_id):
        raise WorkbenchError(f"bad sweep id {sweep_id!r}; a sweep id is hexadecimal (see the sweeps table)")
    return ("SELECT c.sweep_id, c.spec, r.run_id, r.tok_per_s, r.peak_cache_bytes, r.weight_bytes, "
            "r.mean_accepted_length FROM sweep_cells c JOIN run_summary r USING (run_id) "
            f"WHERE c.status = 'done' AND c.sweep_id = '{sweep_id}'")


def pareto_front(points: Sequence[tuple[float, float]], lower_y_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (x: higher is better), sorted by x."""
    sign = 1 if lower_y_better else -1
    front = []
    for i, (x, y) in enumerate(points):
        beaten = any(ox >= x and sign * oy <= sign * y and (ox, oy) != (x, y) for ox, oy in points)
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def sweep_pareto_figure(rows: list[dict[str, Any]], y: str = "peak_cache_bytes") -> go.Figure:
    """`rows`: one per finished cell (`sweep_query`'s columns); averaged here per configuration (`spec`)."""
    if y not in Y_METRICS:
        raise ValueError(f"unknown y metric {y!r}; valid: {', '.join(Y_METRICS)}")
    configs: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("tok_per_s") is not None and row.get(y) is not None:
            configs.setdefault(row["spec"] or "plain", []).append(row)
    names = list(configs)
    points = [(sum(r["tok_per_s"] for r in configs[n]) / len(configs[n]),
               sum(r[y] for r in configs[n]) / len(configs[n])) for n in names]
    fig = go.Figure()
    for i, name in enumerate(names):
        fig.add_scatter(x=[points[i][0]], y=[points[i][1]], mode="markers", name=name,
                        marker={"size": 11, "color": column_color(i)},
                        customdata=[[",".join(r["run_id"] for r in configs[name])]],
                        hovertemplate=f"{name}<br>%{{x:.1f}} tok/s<br>{y} %{{y:.4g}}<br>{len(configs[name])} cells"
                                      "<extra></extra>")
    front = pareto_front(points, Y_METRICS[y])
    if len(front) > 1:
        fig.add_scatter(x=[points[i][0] for i in front], y=[points[i][1] for i in front], mode="lines",
                        name="Pareto front", line={"dash": "dot", "color": "#6b7280"}, hoverinfo="skip")
    fig.update_layout(title=f"sweep: speed against {y}<br><sup>one point per configuration, the mean of its "
                      "cells; dotted: the Pareto front</sup>", xaxis_title="tok/s (higher is better)",
                      yaxis_title=f"{y} ({'lower' if Y_METRICS[y] else 'higher'} is better)",
                      paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)")
    return fig
