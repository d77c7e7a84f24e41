"""The roofline of a `workbench bench --roofline` result: bytes read per token against decoding tok/s.

A pure function of the result's JSON (workbench/eval/roofline.py writes it): each engine is a point, the
measured read bandwidth is the curve tok/s = bandwidth / bytes (its spread over the run a band), so a point's
height under the curve is the share of the bandwidth that decoding reaches. Used by the app's Benchmarks tab
and the notebooks' `RooflineView`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from workbench.errors import WorkbenchError

from .figures import _empty, _style
from .palette import column_color

ABOUT = "each point: one engine's decoding; the curve: tok/s at the read bandwidth<br>measured in the same run " \
        "(band: its spread)"
TITLE = "roofline: bytes read per token against tok/s"


def load_roofline(path: str | Path) -> dict[str, Any]:
    """A roofline result file, checked to be one (a clear error otherwise)."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WorkbenchError(f"cannot read a roofline result from {str(path)!r}: {err}") from None
    if not isinstance(result, dict) or "bandwidth" not in result or "rows" not in result:
        raise WorkbenchError(f"{str(path)!r} is not a roofline result (make one with `workbench bench --roofline "
                             "--json FILE`)")
    return result


def roofline_figure(result: dict[str, Any] | None) -> go.Figure:
    """Points (MB per token, tok/s) per engine under the bandwidth curve; hover shows GB/s and its fraction."""
    if not result or not result.get("rows"):
        return _empty(TITLE, "run `workbench bench --roofline --json FILE` and load FILE")
    band = result["bandwidth"]["main_memory"]
    sizes = [r["bytes_per_token"] / 1e6 for r in result["rows"]]
    low, high = 0.6 * min(sizes), 1.4 * max(sizes)
    x = [low + (high - low) * i / 99 for i in range(100)]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x + x[::-1], y=[band["high_gb_s"] * 1e3 / s for s in x]
                             + [band["low_gb_s"] * 1e3 / s for s in x[::-1]], fill="toself", mode="none",
                             fillcolor="rgba(128,128,128,0.2)", name="bandwidth spread", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=x, y=[band["median_gb_s"] * 1e3 / s for s in x], mode="lines",
                             line={"color": "#1f2937"}, name=f"read bandwidth {band['median_gb_s']:.1f} GB/s"))
    for i, (r, size) in enumerate(zip(result["rows"], sizes)):
        fig.add_trace(go.Scatter(
            x=[size], y=[r["tok_per_s"]], mode="markers+text", text=[r["engine"]], textposition="top right",
            marker={"size": 11, "color": column_color(i)}, name=r["engine"],
            hovertemplate=(f"{r['tok_per_s']:.1f} tok/s, {size:.1f} MB/token<br>{r['achieved_gb_s']:.1f} GB/s = "
                           f"{r['fraction_of_bandwidth']:.0%} of the bandwidth<br>{r['ms_not_reading']:.2f} ms of "
                           f"{r['ms_per_token']:.2f} per token not reading<extra>{r['engine']}</extra>")))
    return _style(fig, TITLE, ABOUT, height=420, margin={"l": 50, "r": 20, "t": 80, "b": 50},
                  xaxis={"title": "MB read per token (weights + KV cache)"}, yaxis={"title": "decoding tok/s"},
                  legend={"orientation": "h", "y": -0.2})
