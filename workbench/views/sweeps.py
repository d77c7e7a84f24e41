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

# metric -> whether lower is better (speed is always "higher is better", on x). Costs in bytes, then
# quality: the target's perplexity of the output and the departures from plain decoding (lossy runs).
Y_METRICS = {"peak_cache_bytes": True, "weight_bytes": True, "mean_accepted_length": False,
             "target_perplexity": True, "departure_rate": True}
SWEEPS_QUERY = ("SELECT s.sweep_id, s.name, s.created_at, s.n_cells, count(c.run_id) AS runs FROM sweeps s "
                "LEFT JOIN sweep_cells c ON c.sweep_id = s.sweep_id AND c.status = 'done' GROUP BY ALL "
                "ORDER BY s.created_at DESC")  # the sweeps to choose from, newest first


def sweep_query(sweep_id: str) -> str:
    """The rows `sweep_pareto_figure` takes, as one query a sealed Reader runs (the id is checked as hex)."""
    if not re.fullmatch(r"[0-9a-f]{1,64}", sweep_id):
        raise WorkbenchError(f"bad sweep id {sweep_id!r}; a sweep id is hexadecimal (see the sweeps table)")
    return (f"SELECT c.sweep_id, c.spec, r.run_id, r.tok_per_s, {', '.join('r.' + m for m in Y_METRICS)} "
            "FROM sweep_cells c JOIN run_summary r USING (run_id) "
            f"WHERE c.status = 'done' AND c.sweep_id = '{sweep_id}'")


def sweep_label(row: dict[str, Any]) -> str:
    """How a sweep is named in pickers: its name, finished runs and id."""
    return f"{row['name']} · {row['runs']} runs · {row['sweep_id'][:8]}"


def configurations(rows: list[dict[str, Any]], y: str) -> list[dict[str, Any]]:
    """One row per configuration (`spec`) with both metrics: its name, mean tok/s, mean `y`, cells and run
    ids, in first-seen order. The Pareto figure draws these; a click on a point opens its run ids."""
    if y not in Y_METRICS:
        raise WorkbenchError(f"unknown y metric {y!r}; valid: {', '.join(Y_METRICS)}")
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("tok_per_s") is not None and row.get(y) is not None:
            groups.setdefault(row["spec"] or "plain", []).append(row)
    names = short_names(list(groups))
    return [{"configuration": names[name], "tok_per_s": sum(r["tok_per_s"] for r in group) / len(group),
             y: sum(r[y] for r in group) / len(group), "cells": len(group),
             "run_ids": [r["run_id"] for r in group]} for name, group in groups.items()]


def pareto_front(points: Sequence[tuple[float, float]], lower_y_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (x: higher is better), sorted by x."""
    sign = 1 if lower_y_better else -1
    front = []
    for i, (x, y) in enumerate(points):
        beaten = any(ox >= x and sign * oy <= sign * y and (ox, oy) != (x, y) for ox, oy in points)
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def short_names(specs: list[str]) -> dict[str, str]:
    """Each spec string without the fields every one of them shares (model, dtype, max_new_tokens, ...), so a
    configuration is named by what sets it apart; "plain" when nothing does."""
    parts = {spec: [p for p in spec.split(";") if p] for spec in specs}
    shared = set.intersection(*(set(p) for p in parts.values())) if len(specs) > 1 else set()
    return {spec: ";".join(p for p in parts[spec] if p not in shared) or "plain" for spec in specs}


def sweep_pareto_figure(rows: list[dict[str, Any]], y: str = "peak_cache_bytes") -> go.Figure:
    """`rows`: one per finished cell (`sweep_query`'s columns); averaged here per configuration (`spec`)."""
    configs = configurations(rows, y)
    names = [c["configuration"] for c in configs]
    points = [(c["tok_per_s"], c[y]) for c in configs]
    fig = go.Figure()
    for i, name in enumerate(names):
        fig.add_scatter(x=[points[i][0]], y=[points[i][1]], mode="markers", name=name,
                        marker={"size": 11, "color": column_color(i)},
                        customdata=[[",".join(configs[i]["run_ids"])]],
                        hovertemplate=f"{name}<br>%{{x:.1f}} tok/s<br>{y} %{{y:.4g}}<br>{configs[i]['cells']} "
                                      "cells (click to open their runs)<extra></extra>")
    front = pareto_front(points, Y_METRICS[y])
    if len(front) > 1:
        fig.add_scatter(x=[points[i][0] for i in front], y=[points[i][1] for i in front], mode="lines",
                        name="Pareto front", line={"dash": "dot", "color": "#6b7280"}, hoverinfo="skip")
    if not configs:
        fig.add_annotation(text=f"no finished cells with {y} in this sweep", showarrow=False)
    fig.update_layout(title=f"sweep: speed against {y}<br><sup>one point per configuration, the mean of its "
                      "cells; dotted: the Pareto front; click a point to open its runs</sup>",
                      xaxis_title="tok/s (higher is better)",
                      yaxis_title=f"{y} ({'lower' if Y_METRICS[y] else 'higher'} is better)",
                      paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)")
    return fig
