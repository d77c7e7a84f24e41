"""H2O: heavy hitters by accumulated attention, plus recent tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from workbench.cache.base import KVCache
from workbench.cache.scores import (
    AccumulatedAttention,
    BudgetEviction,
    attach_each,
    context_length,
    select,
)
from workbench.registry import param, register


@register("cache", "h2o", lossless=False)
@dataclass
class H2OPolicy(BudgetEviction):
    """H2O: keep the heavy hitters (tokens that received the most attention so far) and the recent tokens.

    "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models" (arXiv
    2306.14048). An observer adds up, per kv head, the attention every committed query pays each held token
    (summed over the query heads of the group; rejected drafts never count). After the prefill and after
    every step (`continuous=false`: the prefill only), each layer is cut to `budget` tokens per head (the
    paper's fixed cache size; `fraction` > 0: that fraction of the tokens seen instead): the most recent
    `recent` share of them, and the highest accumulated scores among the rest, chosen independently in each
    head (the paper's greedy eviction, one token per step in steady state). The evicted slots are given back,
    so memory is bounded by the budget. Left out: scores are float32 sums, never renormalised.
    """

    budget: int = param(1024, "tokens kept per layer and head: heavy hitters + recent", min=1, max=1 << 20)
    fraction: float = param(0.0, "when above 0: keep this fraction of the context's tokens instead of `budget` "
                                  "(0: `budget` tokens)", min=0.0, max=1.0)
    recent: float = param(0.5, "share of the kept tokens that are the most recent ones; the rest are heavy hitters",
                          min=0.0, max=1.0)
    continuous: bool = param(True, "keep evicting while decoding (the paper); false: compress the prompt only")
    _scores: list[AccumulatedAttention] = field(default_factory=list, init=False, repr=False)

    def absolute(self) -> int:
        return self.budget

    def on_cache_built(self, cache: KVCache) -> None:
        super().on_cache_built(cache)
        self._scores = attach_each(cache, AccumulatedAttention)

    def evict(self, cache: KVCache) -> None:
        for layer, observer in zip(cache.layers, self._scores):
            keep = self.kept(context_length(layer))
            if layer.n_committed <= keep:
                continue
            scores, _ = observer.for_layer(layer)
            layer.keep(select(scores, keep, recent=math.ceil(self.recent * keep)))
