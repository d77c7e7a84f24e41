"""HTML of a run's text: tokens coloured by source, with a hover per token, and the kept-token mask.

Token text goes through `html.escape`: model output and prompts are never trusted as markup.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any

from workbench.trace import Trace

from .kv import cached_positions, latest_kept

Label = Callable[[int], str]
CSS = """
.wb-text {font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.7; white-space: pre-wrap;
          max-height: 360px; overflow-y: auto; padding: 6px; border: 1px solid #e5e7eb; border-radius: 6px}
.wb-tok {border-radius: 3px; padding: 0 1px; cursor: help}
.wb-prompt {color: #6b7280}
.wb-bonus {background: #dbeafe}
.wb-accepted {background: #bbf7d0}
.wb-kept {background: #bbf7d0}
.wb-evicted {background: #fecaca; text-decoration: line-through}
.wb-unknown {background: #f3f4f6}
.wb-legend span {margin-right: 10px}
.wb-error {color: #b91c1c; font-weight: 600}
"""
LEGEND = ('<div class="wb-legend"><span class="wb-tok wb-accepted">accepted draft</span>'
          '<span class="wb-tok wb-bonus">bonus (target) token</span><span class="wb-tok wb-prompt">prompt</span>'
          '</div>')


def _span(text: str, cls: str, title: str) -> str:
    return (f'<span class="wb-tok {cls}" title="{html.escape(title, quote=True)}">'
            f'{html.escape(text)}</span>')


def held_by(trace: Trace) -> Callable[[int], str]:
    """Position -> whether its KV entry is still held, across every layer and kv head, at the latest step
    that reports it."""
    events = trace.events
    if not events:
        return lambda pos: "not reported"
    last = events[-1]
    stats = getattr(last, "cache_stats", None)
    kept = None
    for event in reversed(events):
        s = getattr(event, "cache_stats", None)
        if s is not None and getattr(s, "kept", None) is not None:
            kept, stats = s.kept, s
            break
    pending = cached_positions(last)
    if kept is not None:
        sets = [set(h) for layer in kept for h in layer]
        sim = " (simulated)" if getattr(stats, "simulated", False) else ""

        def from_stats(pos: int) -> str:
            if pos >= pending:
                return "pending: not cached yet"
            n = sum(pos in s for s in sets)
            if n == len(sets):
                return f"held by every layer and head{sim}"
            return f"held by {n} of {len(sets)} layer-heads{sim}" if n else f"evicted everywhere{sim}"

        return from_stats
    dense = bool(last.cache_tokens) and min(last.cache_tokens) >= pending

    def from_counts(pos: int) -> str:
        if pos >= pending:
            return "pending: not cached yet"
        return "held (every layer holds every position)" if dense else "not reported per token"

    return from_counts


def token_title(token: int, source: str, logprob: float | None, alternatives: list, label: Label,
                draft: float | None, target: float | None, held: str) -> str:
    lines = [f"id {token}  {label(token)!r}", f"source: {source}"]
    if logprob is not None:
        lines.append(f"logprob {logprob:.3f} (p = {math.exp(logprob):.3f})")
    if alternatives:
        lines.append("top: " + ", ".join(f"{label(int(t))!r} {p:.3f}" for t, p in alternatives))
    if source == "accepted":
        ratio = "n/a" if draft is None or target is None else f"{min(1.0, target / draft) if draft else 1.0:.3f}"
        lines.append(f"draft prob q = {'n/a (no draft distribution)' if draft is None else f'{draft:.3f}'}")
        lines.append(f"target prob p = {'n/a' if target is None else f'{target:.3f}'};  min(1, p/q) = {ratio}")
    lines.append(f"KV: {held}")
    return "\n".join(lines)


def tokens_html(trace: Trace | None, label: Label, error: str | None = None, show_prompt: bool = False) -> str:
    """The generated text, one hoverable span per token."""
    if error:
        return f'<div class="wb-text"><span class="wb-error">{html.escape(error)}</span></div>'
    if trace is None:
        return '<div class="wb-text"></div>'
    held = held_by(trace)
    parts = [LEGEND, '<div class="wb-text">']
    if show_prompt:
        for pos, token in enumerate(trace.prompt_ids):
            parts.append(_span(label(token), "wb-prompt", token_title(token, "prompt", None, [], label, None, None,
                                                                    held(pos))))
    for event in trace.events:
        parts += event_spans(event, label, held)
    parts.append("</div>")
    return "".join(parts)


def event_spans(event, label: Label, held: Callable[[int], str]) -> list[str]:
    """One hoverable span per token a step committed (the live race appends these as steps arrive)."""
    parts = []
    accepted_nodes = []
    if event.tree is not None:
        accepted_nodes = sorted((d, i) for i, (d, a) in enumerate(zip(event.tree.depths, event.tree.accepted))
                                if a)
    for i, token in enumerate(event.tokens):
        draft = target = None
        if event.sources[i] == "accepted" and i < len(accepted_nodes):
            node = accepted_nodes[i][1]
            draft, target = event.tree.draft_probs[node], event.tree.target_probs[node]
        alternatives = event.alternatives[i] if i < len(event.alternatives) else []
        title = token_title(token, event.sources[i], event.logprobs[i], alternatives, label, draft, target,
                            held(event.positions[i]))
        parts.append(_span(label(token), f"wb-{event.sources[i]}", title))
    return parts


def kept_mask_html(trace: Trace | None, label: Label, layer: int, head: int) -> str:
    """Prompt and output with each token marked kept or evicted by one layer and kv head."""
    if trace is None or not trace.events:
        return '<div class="wb-text">no run yet</div>'
    found = latest_kept(trace.events, layer, head)
    ids = trace.prompt_ids + trace.token_ids
    if found is None:
        return (f'<div class="wb-text">layer {layer}, head {head}: which tokens are kept is not reported for this '
                "run (the policy reports counts only, or the run was replayed from a store without kept masks)</div>")
    step, kept = found
    sim = " (simulated: masked, not freed)" if getattr(getattr(trace.events[-1], "cache_stats", None), "simulated",
                                                          False) else ""
    end = cached_positions(next(e for e in trace.events if e.step == step))
    parts = [f'<div class="wb-legend">layer {layer}, kv head {head}, step {step}: {len(kept)} of {end} positions '
             f'kept{sim} <span class="wb-tok wb-kept">kept</span><span class="wb-tok wb-evicted">evicted</span>'
             '<span class="wb-tok wb-unknown">not cached yet</span></div><div class="wb-text">']
    for pos, token in enumerate(ids):
        cls = "wb-unknown" if pos >= end else ("wb-kept" if pos in kept else "wb-evicted")
        parts.append(_span(label(token), cls, f"position {pos}, id {token}"))
    parts.append("</div>")
    return "".join(parts)


def stats_markdown(trace: Trace | None, status: str) -> str:
    """The live line under a column: tok/s, mean accepted length, cache bytes and status."""
    if trace is None or not trace.events:
        return status
    s: dict[str, Any] = trace.summary()
    lossy = "" if s["lossless"] else " · **lossy**"
    return (f"**{s['tok_per_s']:.1f} tok/s** · mean accepted length **{s['mean_accepted_length']:.2f}** · "
            f"KV cache **{s['cache_bytes'] / 2**20:.2f} MiB** · {s['n_new_tokens']} tokens in "
            f"{s['target_forwards']} forwards{lossy} · {status}")
