"""The recorded runs as a list: a configuration's label from its `run_summary` row, and the list's filter
(the app's Runs tab and the notebook's RunsBrowser both show them)."""

from __future__ import annotations

from typing import Any


def config_label(row: dict[str, Any]) -> str:
    """A run's whole configuration (decoding, acceptance rule, cache policy, weight transform) from its
    `run_summary` row."""
    parts = [row.get("decode") or "plain"]
    if row.get("accept"):
        parts.append(f"accept={row['accept']}")
    parts += [row[k] for k in ("cache", "compress") if row.get(k)]
    return " + ".join(parts)


def run_label(row: dict[str, Any]) -> str:
    return f"{row['run_id'][:8]} · {config_label(row)}"


def filter_runs(rows: list[dict[str, Any]], status: str, decode: str, text: str) -> list[dict[str, Any]]:
    text = (text or "").strip().lower()
    out = []
    for r in rows:
        if status not in (None, "", "all") and r["status"] != status:
            continue
        if decode not in (None, "", "all") and r["decode_name"] != decode:
            continue
        if text and not any(text in str(r.get(k) or "").lower() for k in ("run_id", "spec", "prompt", "model")):
            continue
        out.append(r)
    return out
