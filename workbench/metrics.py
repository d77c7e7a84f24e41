"""Every run metric, computed from a Trace in one place. Surfaces render these; they never recompute.

Definitions:
- target_forwards: the target's verification forwards, the prefill included (one per StepEvent).
- mean_accepted_length: generated tokens per verification forward (1.0 for plain decoding).
- drafter_forwards: forwards through all of the target's layers that the drafter ran itself (a search's
  expansions, lookaheads, drafts over a sparse view of the target's cache); partial forwards (a self-draft's
  first layers) are not counted.
- tokens_per_target_forward: generated tokens per forward through the whole target, the drafter's own
  included. For drafters that run the target while drafting (astar, adadec, superposed, triforce) the mean
  accepted length overstates what decoding saved; this does not.
- ttft_s: time to first token, the prefill and the first token's choice.
- tok_per_s: generated tokens over the whole run's time (prefill included).
- decode_tok_per_s: tokens after the first, over the time after the first.
- acceptance_rate: accepted draft tokens over drafted tokens (nodes of the trees).
- alpha, predicted_tokens_per_step, tokens_per_step (chain drafts only, else None): alpha is the
  per-token acceptance rate, estimated as accepted / (accepted + steps that rejected a draft token) (the
  maximum-likelihood estimate when each drafted token is accepted with probability alpha until the first
  rejection); the prediction is Leviathan et al.'s expected tokens per step (1 - alpha^(k+1)) / (1 - alpha)
  with k the mean draft length, shown beside the measured tokens per drafting step.
- lossless: whether the run keeps the target's output (drafter, acceptor, cache policies and weight transforms
  all lossless: RunSpec.lossless).
- simulated: the run's techniques whose speed is simulated (no kernel runs their format here), so its tok/s
  says nothing about what the format could reach.
- warm_start: whether a drafter started from state kept from earlier runs (opt-in, e.g. token recycling's
  hot_start), so the run's acceptance depends on what ran before it.
- warnings: what a user should know before trusting the run's figures, in plain words (a cache policy whose
  budget the context never reaches evicts nothing; one that degenerates into a sliding window on this prompt).
- cache_bytes / peak_cache_bytes: what the process holds for the KV cache (its tensors' storages, spare
  capacity included), at the end and at its largest; cache_live_bytes / peak_cache_live_bytes: what the tokens
  held take in their stored form (a quantized or evicting policy's saving shows here first).
- cache_off_bytes / peak_cache_off_bytes: what a two-tier policy (ShadowKV, LServe with offload) holds off the
  fast tier, in host memory, not counted in cache_bytes; cache_moved_bytes / cache_moved_s: what it brought back
  from there over the run, and the time that took.
- kv_loaded_tokens / kv_load_s: prompt tokens whose cache a policy loaded from a file (CacheGen's `load`)
  instead of prefilling them, and the time that took; prefill_s is then the rest of the prompt's prefill.
- departures / departure_rate / first_departure: output tokens that are not the target's own argmax at their
  position, where the output departs from greedy plain decoding (workbench/divergence.py); target_perplexity:
  the target's perplexity of the output.
- acceptance_per_position[d]: of the steps that drafted a node at depth d + 1, the fraction that
  accepted a node at that depth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workbench.divergence import divergence

if TYPE_CHECKING:
    from workbench.trace import Trace


def summarize(trace: Trace) -> dict[str, Any]:
    events = trace.events
    n_new = sum(len(e.tokens) for e in events)
    total_s = events[-1].elapsed_ns / 1e9 if events else 0.0
    ttft_s = events[0].elapsed_ns / 1e9 if events else 0.0
    drafted = sum(e.n_drafted for e in events)
    accepted = sum(e.n_accepted for e in events)
    forwards = len(events)
    drafter_forwards = sum(e.drafter_forwards for e in events)
    return {
        "n_new_tokens": n_new,
        "target_forwards": forwards,
        "mean_accepted_length": n_new / forwards if forwards else 0.0,
        "drafter_forwards": drafter_forwards,
        "tokens_per_target_forward": n_new / (forwards + drafter_forwards) if forwards else 0.0,
        "ttft_s": ttft_s,
        "total_s": total_s,
        "tok_per_s": n_new / total_s if total_s else 0.0,
        "decode_tok_per_s": (n_new - 1) / (total_s - ttft_s) if n_new > 1 and total_s > ttft_s else 0.0,
        "draft_s": sum(e.draft_ns for e in events) / 1e9,
        "verify_s": sum(e.verify_ns for e in events[1:]) / 1e9,
        "prefill_s": events[0].verify_ns / 1e9 if events else 0.0,
        "accept_s": sum(e.accept_ns for e in events) / 1e9,
        "nodes_drafted": drafted,
        "tokens_accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "acceptance_per_position": acceptance_per_position(trace),
        "cache_bytes": events[-1].cache_bytes if events else 0,
        "peak_cache_bytes": max((e.cache_bytes for e in events), default=0),
        "cache_live_bytes": events[-1].cache_live_bytes if events else 0,
        "peak_cache_live_bytes": max((e.cache_live_bytes for e in events), default=0),
        "cache_off_bytes": events[-1].cache_off_bytes if events else 0,
        "peak_cache_off_bytes": max((e.cache_off_bytes for e in events), default=0),
        "cache_moved_bytes": events[-1].cache_moved_bytes if events else 0,
        "cache_moved_s": events[-1].cache_moved_ns / 1e9 if events else 0.0,
        "kv_loaded_tokens": events[0].loaded_tokens if events else 0,
        "kv_load_s": events[0].load_ns / 1e9 if events else 0.0,
        "finish_reason": trace.finish_reason,
        "lossless": trace.spec.lossless,
        "simulated": list(trace.simulated),
        "warm_start": trace.warm_start,
        "warnings": list(trace.warnings),
        "provenance": trace.provenance,
        **chain_acceptance(trace),
        **divergence(trace),
    }


def acceptance_per_position(trace: Trace) -> list[float]:
    """Fraction of steps whose tree reached depth d that accepted a node at depth d, for d = 1, 2, ..."""
    reached: list[int] = []
    hit: list[int] = []
    for event in trace.events:
        tree = event.tree
        if tree is None:
            continue
        deepest = max(tree.depths)
        deepest_accepted = max((d for d, a in zip(tree.depths, tree.accepted) if a), default=0)
        while len(reached) < deepest:
            reached.append(0)
            hit.append(0)
        for d in range(deepest):
            reached[d] += 1
            hit[d] += d < deepest_accepted
    return [h / r for h, r in zip(hit, reached)]


def chain_acceptance(trace: Trace) -> dict[str, float | None]:
    """Measured against predicted tokens per step for chain drafts (see the module docstring)."""
    steps = [e for e in trace.events if e.tree is not None]
    none = {"alpha": None, "predicted_tokens_per_step": None, "tokens_per_step": None}
    if not steps or any(e.tree.parents != list(range(-1, len(e.tree.parents) - 1)) for e in steps):
        return none
    accepted = sum(e.n_accepted for e in steps)
    rejections = sum(e.n_accepted < len(e.tree.tokens) for e in steps)
    if accepted + rejections == 0:
        return none
    alpha = accepted / (accepted + rejections)
    k = sum(len(e.tree.tokens) for e in steps) / len(steps)
    predicted = k + 1 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return {"alpha": alpha, "predicted_tokens_per_step": predicted,
            "tokens_per_step": sum(e.n_accepted + 1 for e in steps) / len(steps)}
