"""What `workbench eval` shows and writes: a markdown table, the JSON, and plots beside it.

Plots (matplotlib, the `dev` extra): quality against cache bytes for cache runs (one line per policy
across budgets, kvpress presses as hollow markers), and size against quality and speed against quality
for weight transforms. Surfaces render these results; every number is computed in `runner`/`quality`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _bytes(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return "-"
    ratio = row.get(key.replace("bytes", "ratio"))
    n = row[key]
    size = f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
    return size + (f" ({ratio:.1%})" if ratio is not None else "")


def _retrieval(row: dict[str, Any], task: str) -> str:
    if task not in row:
        return "-"
    by_length = " / ".join(f"{v:.0%}" for v in row[task]["by_length"].values())
    return f"{row[task]['accuracy']:.0%} ({by_length})"


def _table_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our rows in run order, each followed by the peer rows measured against it."""
    peers = [r for r in rows if r.get("engine") == "kvpress"]
    out = []
    for r in rows:
        if r.get("engine") != "kvpress":
            out.append(r)
            out += [p for p in peers if p.get("peer_of") == r["label"] or
                    (r["kind"] == "reference" and p["kind"] == "peer-reference")]
    return out


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table, with the settings above it and notes below."""
    rows = _table_order(result["rows"])
    tasks = result["tasks"]
    lengths = "/".join(map(str, result["retrieval"]["lengths"]))
    weights = any(r.get("kind") in ("compress", "combined") for r in rows)
    columns: list[tuple[str, Any]] = [
        ("run", lambda r: r["label"] + (" [simulated]" if r.get("simulated") else "")),
        ("budget", lambda r: _num(r.get("budget"), "g")),
    ]
    if "ppl" in tasks:
        columns += [
            ("perplexity", lambda r: _num(r.get("perplexity"), ".3f")),
            ("Δ ppl", lambda r: _num(r.get("delta_ppl_pct"), "+.2f") + " %"),
            ("KL (nats)", lambda r: _num(r.get("kl"), ".4f")),
            ("top-1", lambda r: _num(r.get("top1_agreement"), ".1%")),
            ("KV live bytes after prefill", lambda r: _bytes(r, "cache_bytes_prefill")),
            ("KV live bytes at end", lambda r: _bytes(r, "cache_bytes_end")),
            ("decode tok/s", lambda r: _num(r.get("decode_tok_per_s"), ".3g")
             + (" (simulated)" if r.get("speed_simulated") else "")),
        ]
    for task, name in (("passkey", "passkey"), ("kv", "key-value")):
        if task in tasks:
            columns.append((f"{name} ({lengths})", lambda r, t=task: _retrieval(r, t)))
    if weights:
        columns += [("weight bytes", lambda r: _bytes(r, "weight_bytes")),
                    ("apply s", lambda r: _num(r.get("apply_s"), ".1f"))]
    if any(r.get("engine") == "kvpress" for r in rows):
        columns.append(("same as ours?", _peer_verdict))
    lines = [
        f"model `{result['model']}`, {result['dtype']} on {result['device']} ({result['hardware']}); "
        f"text `{result['text']}` hash `{result['text_hash']}`",
        f"context {result['context']} tokens: prefill {result['prefill']}, then {result['scored']} scored one per "
        f"step, x {result['windows']} window(s)",
        "",
        "| " + " | ".join(name for name, _ in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in rows]
    notes = []
    if "ppl" in tasks:
        notes.append(f"decode tok/s: the scored one-token steps (forward, commit, policy hooks) measured on this "
                     f"machine ({result['hardware']}); compare rows of one run only")
    if any(r.get("speed_simulated") for r in rows):
        notes.append("tok/s (simulated): a transform has no kernel here and runs dequantize-then-matmul")
    if any(r.get("simulated") for r in rows):
        notes.append("[simulated]: the policy masks tokens instead of freeing them; its bytes are not a real saving")
    disagree = [r for r in rows if r.get("engine") == "kvpress" and r.get("agrees") is False]
    for r in disagree:
        ours = next((o for o in rows if o["label"] == r["peer_of"]), {})
        held = (f"; KV bytes at the end: ours {ours['cache_ratio_end']:.1%}, kvpress {r['cache_ratio_end']:.1%}"
                if "cache_ratio_end" in ours and "cache_ratio_end" in r else "")
        notes.append(f"DISAGREEMENT: {r['peer_of']} vs {r['label']} at budget {r['budget']}: per-token NLL gap "
                     f"{r['nll_gap']:+.4f} nats (se {r['nll_gap_se']:.4f}), KL gap {r['kl_gap']:+.4f} "
                     f"(se {r['kl_gap_se']:.4f}, full-cache floor {r['kl_full_cache_floor']:.4f}){held}"
                     + ("" if r.get("same_method") else "; the methods differ (approximate pair)"))
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _peer_verdict(row: dict[str, Any]) -> str:
    if row.get("engine") != "kvpress" or "agrees" not in row:
        return ""
    verdict = "yes" if row["agrees"] else "**NO**"
    return verdict + ("" if row.get("same_method") else " (approx. method)")


def write(result: dict[str, Any], out: str | Path) -> list[Path]:
    """Write the JSON to `out`, the table to `out` with .md, and the plots beside them; returns the paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    table = out.with_suffix(".md")
    table.write_text(markdown(result))
    written = [out, table]
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed (the dev extra), so no plots were drawn", file=sys.stderr)
        return written
    matplotlib.use("Agg")
    rows = [r for r in result["rows"] if "kl" in r]
    cache = [r for r in rows if r["kind"] in ("cache", "peer")]
    compress = [r for r in rows if r["kind"] in ("compress", "combined")]
    if cache:
        written.append(_plot_cache(result, rows, out.with_name(out.stem + "_quality_vs_bytes.png")))
    if compress:
        written += _plot_compression(result, rows, out)
    return written


def _plot_cache(result: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["kind"] in ("cache", "peer"):
            series.setdefault(r["series"], []).append(r)
    # A colour per policy (tab20's dark ones first), shared by the kvpress press compared with it.
    palette = plt.get_cmap("tab20").colors
    palette = palette[::2] + palette[1::2]
    ours = [name for name, points in series.items() if points[0]["kind"] == "cache"]
    color = {name: palette[i % len(palette)] for i, name in enumerate(ours)}
    of_run = {r["label"]: r["series"] for r in rows if r["kind"] == "cache"}
    for name, points in series.items():
        if points[0]["kind"] == "peer":
            color[name] = color.get(of_run.get(points[0].get("peer_of")), "grey")
    for ax, key, name in ((axes[0], "kl", "KL(full || run), nats"), (axes[1], "delta_ppl_pct", "Δ perplexity, %")):
        lines, labels = [], []
        for label, points in series.items():
            points = sorted(points, key=lambda r: r["cache_ratio_end"])
            peer = points[0]["kind"] == "peer"
            (line,) = ax.plot([100 * p["cache_ratio_end"] for p in points], [p[key] for p in points],
                              marker="o", linestyle="--" if peer else "-", fillstyle="none" if peer else "full",
                              color=color[label])
            lines.append(line)
            labels.append(label + (" [simulated]" if points[0].get("simulated") else ""))
        ax.set_xlabel("KV-cache bytes at the end, % of the full cache")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=1e-3)
    axes[1].legend(lines, labels, fontsize=7)  # given explicitly: names may start with "_"
    fig.suptitle(f"{result['model']} {result['dtype']}, context {result['context']}, {result['scored']} scored "
                 f"tokens x {result['windows']} (text {result['text_hash']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_compression(result: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["kind"] in ("reference", "compress", "combined")]
    paths = []
    for key, name, suffix in (("weight_bytes", "weight bytes, MiB", "size"),
                              ("decode_tok_per_s", f"decode tok/s ({result['hardware']})", "speed")):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for r in shown:
            x = r[key] / 2**20 if key == "weight_bytes" else r[key]
            ax.scatter(x, r["perplexity"], marker="*" if r["kind"] == "reference" else "o")
            name = r["label"] if r["kind"] == "combined" else r["compress"]
            ax.annotate(f"uncompressed {result['dtype']}" if r["kind"] == "reference" else name,
                        (x, r["perplexity"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
        ax.set_xlabel(name)
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
        ax.set_title(f"{result['model']}: {suffix} vs quality (text {result['text_hash']})", fontsize=9)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}_{suffix}_vs_quality.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
