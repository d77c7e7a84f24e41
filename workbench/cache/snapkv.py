"""SnapKV: observation-window voting at prefill."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from workbench.cache.base import CachePolicy, KVCache
from workbench.cache.scores import WindowVote, attach_each, detach, kept_tokens, select
from workbench.errors import SpecError
from workbench.registry import param, register


@register("cache", "snapkv", lossless=False)
@dataclass
class SnapKVPolicy(CachePolicy):
    """SnapKV: the prompt's last queries vote for the earlier tokens each head keeps.

    "SnapKV: LLM Knows What You are Looking for Before Generation" (arXiv 2404.14469). At the end of the
    prefill, the attention the last `window` prompt queries pay each earlier token is summed over the window
    (and over the query heads sharing a kv head), smoothed with a 1-D pool of `kernel` tokens so that
    neighbours of a voted token survive with it, and each kv head keeps its top-voted tokens plus the window
    itself: `budget` tokens per head (the paper's max capacity; `fraction` > 0: that fraction of the prompt
    instead). Prefill only, as in the paper: tokens generated afterwards are all kept. The evicted slots are
    given back, so the prompt's memory is bounded by the budget.
    """

    budget: int = param(1024, "tokens of the prompt kept per layer and head: voted tokens + the window", min=1,
                        max=1 << 20)
    fraction: float = param(0.0, "when above 0: keep this fraction of the prompt's tokens instead of `budget` "
                                  "(0: `budget` tokens)", min=0.0, max=1.0)
    window: int = param(64, "observation window: the last prompt tokens whose queries vote (all kept)", min=1,
                        max=4096)
    kernel: int = param(5, "pooling kernel over the votes (odd; 1 = no pooling)", min=1, max=63)
    pooling: str = param("avg", "how votes are pooled over neighbouring tokens", choices=("avg", "max"))
    _votes: list[WindowVote] = field(default_factory=list, init=False, repr=False)

    def check(self) -> None:
        if self.fraction == 0 and self.budget < self.window:
            raise SpecError(f"snapkv: budget={self.budget} is smaller than window={self.window}, and the observation "
                            f"window is always kept; raise budget to at least {self.window} or lower window")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel={self.kernel} must be odd, so that pooling keeps every token's place")

    def warnings(self, prompt_tokens: int, new_tokens: int) -> list[str]:
        keep = kept_tokens(prompt_tokens, self.budget, self.fraction)
        if keep >= prompt_tokens:
            return [f"snapkv: its budget keeps all {prompt_tokens} prompt tokens (budget={self.budget}), so this run "
                    "evicts nothing; give a longer prompt or a smaller budget (or fraction=) to see it evict"]
        if keep <= min(self.window, prompt_tokens):
            return [f"snapkv: the {keep} tokens kept per head all fall in the observation window (window="
                    f"{self.window}), so every head keeps the same last {keep} prompt tokens: a sliding window, "
                    "the votes choose nothing; lower window or give a longer prompt"]
        return []

    def on_cache_built(self, cache: KVCache) -> None:
        self._votes = attach_each(cache, lambda: WindowVote(self.window))

    def on_prefill_end(self, cache: KVCache) -> None:
        for layer, observer in zip(cache.layers, self._votes):
            detach(layer, observer)  # decoding costs nothing extra from here on
            n = layer.n_committed
            keep = kept_tokens(n, self.budget, self.fraction)
            if n > keep:
                window = min(self.window, n)
                layer.keep(select(pooled_votes(observer.for_layer(layer), window, self.kernel, self.pooling), keep,
                                  recent=window))
        self._votes = []


def pooled_votes(votes: torch.Tensor, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """votes [kv_heads, S] with the tokens before the window smoothed over `kernel` neighbours (stride 1)."""
    prefix = votes.shape[1] - window
    if kernel == 1 or prefix == 0:
        return votes
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    smoothed = pool(votes[:, None, :prefix], kernel, stride=1, padding=kernel // 2)[:, 0]
    return torch.cat([smoothed, votes[:, prefix:]], 1)
