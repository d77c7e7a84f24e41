"""What the KV cache holds at a step, read from a StepEvent.

`event.cache_stats` (when the engine reports it) has `tokens`, `bytes`, `bits` and `sparsity` as
[layer][kv_head] lists, `kept` as None or [layer][kv_head] lists of the logical positions held, and
`simulated` (a policy that masks instead of freeing memory). Without it, only tokens held per layer
(`cache_tokens`) and the total bytes (`cache_bytes`) are known, and the figures say so.
"""

from __future__ import annotations

from typing import Any

METRICS = ("bytes", "sparsity", "tokens", "bits")


def cached_positions(event: Any) -> int:
    """Logical positions in the cache after this step: every committed token but the pending last one."""
    return event.positions[-1] if event.positions else 0


def kv_grid(event: Any, metric: str) -> tuple[list[list[float]], str] | None:
    """([layer][head] values of `metric`, a note on how they were obtained), or None if unknown."""
    stats = getattr(event, "cache_stats", None)
    if stats is not None and getattr(stats, metric, None) is not None:
        return getattr(stats, metric), "simulated: masked, not freed" if getattr(stats, "simulated", False) else ""
    held = event.cache_tokens
    if not held:
        return None
    logical = cached_positions(event)
    if metric == "tokens":
        return [[t] for t in held], "per layer (all heads): per-head detail not reported"
    if metric == "sparsity":
        return [[1 - t / logical if logical else 0.0] for t in held], "per layer: 1 - tokens held / positions"
    if metric == "bytes" and sum(held):
        total = sum(held)
        return ([[event.cache_bytes * t / total] for t in held],
                f"total {event.cache_bytes} bytes split over layers by tokens held (estimate)")
    return None


def kept_positions(event: Any, layer: int, head: int) -> set[int] | None:
    """Logical positions held by one layer and kv head after this step, or None when not reported.

    A layer that holds every cached position (the dense cache) is known to keep them all."""
    stats = getattr(event, "cache_stats", None)
    kept = getattr(stats, "kept", None) if stats is not None else None
    if kept is not None and layer < len(kept) and head < len(kept[layer]):
        return set(kept[layer][head])
    logical = cached_positions(event)
    if event.cache_tokens and layer < len(event.cache_tokens) and event.cache_tokens[layer] >= logical:
        return set(range(logical))
    return None


def latest_kept(events: list[Any], layer: int, head: int) -> tuple[int, set[int]] | None:
    """The last step (and its kept positions) at which `layer`/`head`'s kept set is known."""
    for event in reversed(events):
        kept = kept_positions(event, layer, head)
        if kept is not None:
            return event.step, kept
    return None


def shape(event: Any) -> tuple[int, int]:
    """(layers, kv heads) of the cache as reported by this event (heads 1 when only per-layer is known)."""
    stats = getattr(event, "cache_stats", None)
    if stats is not None and getattr(stats, "tokens", None):
        return len(stats.tokens), len(stats.tokens[0])
    return len(event.cache_tokens), 1
