"""PrefixKV: per-layer budgets found by binary search on a global importance threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from workbench.cache.base import CachePolicy, KVCache
from workbench.cache.scores import AccumulatedAttention, attach_each, check_budget, detach, kept_count, select
from workbench.registry import param, register


@register("cache", "prefix_kv", lossless=False)
@dataclass
class PrefixKVPolicy(CachePolicy):
    """PrefixKV: layers keep different numbers of tokens, set by one global threshold on cumulative importance.

    "PrefixKV: Adaptive Prefix KV Cache is What Vision Instruction-Following Models Need for Efficient
    Generation" (arXiv 2412.03409). At the end of the prefill, each layer's tokens are ranked by importance
    (the attention they received from the prompt's queries, summed over heads); the sorted, normalised
    cumulative sum is the layer's prefix curve. A global share p of importance is found by binary search so
    that the tokens each layer needs to reach p add up to the budget (kept_count(prompt, budget) x layers, any
    tokens left by the search's last step going to the layers whose next token matters most); each layer then
    keeps that many tokens per kv head: its `window` most recent and its most-attended ones, per head. Prefill
    only: tokens generated afterwards are all kept. Left out: the paper's offline search of one configuration
    per model (searched per prompt here) and its vision-language setting.
    """

    budget: float = param(0.5, "fraction of the prompt's tokens kept, over all layers together", min=0.0, max=1.0)
    window: int = param(64, "most recent prompt tokens every layer keeps (within its budget)", min=0, max=4096)
    _scores: list[AccumulatedAttention] = field(default_factory=list, init=False, repr=False)

    def check(self) -> None:
        check_budget(self.budget)

    def on_cache_built(self, cache: KVCache) -> None:
        self._scores = attach_each(cache, AccumulatedAttention)

    def on_prefill_end(self, cache: KVCache) -> None:
        for layer, observer in zip(cache.layers, self._scores):
            detach(layer, observer)
        scores = [o.for_layer(layer)[0] for layer, o in zip(cache.layers, self._scores)]
        total = sum(kept_count(layer.n_committed, self.budget) for layer in cache.layers)
        for layer, score, keep in zip(cache.layers, scores, layer_budgets([prefix_curve(s) for s in scores], total)):
            if layer.n_committed > keep:
                layer.keep(select(score, keep, recent=min(self.window, keep)))
        self._scores = []


def prefix_curve(scores: torch.Tensor) -> torch.Tensor:
    """[n] cumulative share of a layer's importance held by its top 1, 2, ... n tokens (scores [kv_heads, n])."""
    importance = scores.sum(0).sort(descending=True).values.double().cpu()  # the search reads it often
    return importance.cumsum(0) / importance.sum().clamp_min(1e-30)


def layer_budgets(curves: list[torch.Tensor], total: int) -> list[int]:
    """Tokens per layer adding up to `total`: binary search for the largest share p of importance whose
    per-layer token counts (the tokens needed to reach p, at least 1) fit in `total`, then the remaining
    tokens one by one to the layers whose next token carries the most importance."""
    sizes = [len(c) for c in curves]
    if total >= sum(sizes):
        return sizes

    def counts(p: float) -> list[int]:
        return [min(n, int(torch.searchsorted(c, p)) + 1) for c, n in zip(curves, sizes)]

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(counts(mid)) <= total else (lo, mid)
    kept = counts(lo)
    for _ in range(total - sum(kept)):
        gains = [float(c[k] - c[k - 1]) if k < n else -math.inf for c, k, n in zip(curves, kept, sizes)]
        kept[gains.index(max(gains))] += 1
    return kept
