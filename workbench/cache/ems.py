"""EMS: evict-then-merge per head, by global-local importance."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from workbench.cache.base import CachePolicy, KVCache, LayerCache
from workbench.cache.scores import (
    AccumulatedAttention,
    WindowVote,
    attach,
    check_budget,
    detach,
    kept_count,
    require_writable,
    select,
)
from workbench.registry import param, register

SIMILARITY_CHUNK = 1024  # candidate rows per block of cosine similarities: never all (n - keep) x keep at once


@register("cache", "ems", lossless=False)
@dataclass
class EMSPolicy(CachePolicy):
    """EMS: per head, keep the best global-local tokens; every other token joins the class of its most similar
    kept token (merged into it) or the zero class (evicted).

    "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on Global-Local
    Importance" (arXiv 2412.08521). At the end of the prefill, per kv head:
    - Global-Local score: global = the attention a token received from all prompt queries divided by how many
      queries could see it (accumulated attention alone favours early tokens because of the causal mask);
      local = the attention of the last `window` queries (SnapKV's vote). Each is normalised to sum 1 over the
      prompt and the two are added.
    - Evict-then-merge, unified by the zero class: the kept_count(prompt, budget) best tokens stay (the window
      always among them) and are the class centres. Every other token joins the centre whose key is most
      similar (cosine), or the zero class when that similarity is below `threshold`; the zero class is
      dropped, so eviction is merging into it. Each centre's key and value become the score-weighted mean of
      itself and its members. How many tokens a head merges and how many it evicts therefore differs per head:
      a head with redundant keys merges most of them, a head whose keys differ evicts them, and in a sparse head
      the evicted tokens' near-zero scores give them near-zero weight (`merged` records the count per layer
      and head). `merge` < 1 lets only the best-scored share of the non-kept tokens join a class (0 = plain
      eviction, which any storage form supports).
    Measured on SmolLM2-135M at 2k tokens (docs/cache_eviction.md), merging costs perplexity at budgets 0.05,
    0.25 and 0.5 (merge=0 is best, merge=1 worst), so the default merges half the non-kept tokens, as the
    first version did, and merge=0 is one parameter away.
    Prefill only: tokens generated afterwards are all kept. Merging rewrites stored keys and values, so EMS
    needs the dense storage form (it refuses others unless merge=0).
    Sources: the paper's method section could not be retrieved here, only its abstract and third-party
    summaries (the zero class unifies eviction and merging so that every head compresses in parallel with one
    shape, as here: each head assigns the same number of tokens, and the zero class absorbs the difference).
    The weighting of the global and local scores, the cosine `threshold` and the score-weighted means are this
    version's reading, not checked against the paper's formulas. Left out: the paper's fused kernel, a fixed
    token budget (a fraction here), and any RoPE correction of merged keys (a merged key mixes rotations of
    nearby positions).
    """

    budget: float = param(0.5, "fraction of the prompt's tokens kept per head (the class centres)", min=0.0,
                          max=1.0)
    window: int = param(64, "local window: the last prompt tokens whose queries give the local score (all kept)",
                        min=1, max=4096)
    merge: float = param(0.5, "share of the non-kept tokens (best-scored first) that may join a class; the rest "
                         "are evicted (1 = all, the unified form; 0 = eviction only)", min=0.0, max=1.0)
    threshold: float = param(0.5, "cosine similarity to the nearest kept key below which a token joins the zero "
                             "class (evicted)", min=-1.0, max=1.0)
    merged: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)  # per layer: [kv_heads]
    _global: list[AccumulatedAttention] = field(default_factory=list, init=False, repr=False)
    _local: list[WindowVote] = field(default_factory=list, init=False, repr=False)

    def check(self) -> None:
        check_budget(self.budget)

    def on_cache_built(self, cache: KVCache) -> None:
        if self.merge > 0:
            require_writable("ems", cache)
        self._global = [AccumulatedAttention() for _ in cache.layers]
        self._local = [WindowVote(self.window) for _ in cache.layers]
        for layer, g, loc in zip(cache.layers, self._global, self._local):
            attach(layer, g)
            attach(layer, loc)

    def on_prefill_end(self, cache: KVCache) -> None:
        self.merged = []
        for layer, g, loc in zip(cache.layers, self._global, self._local):
            detach(layer, g)
            detach(layer, loc)
            n = layer.n_committed
            keep = kept_count(n, self.budget)
            merged = torch.zeros(layer.positions.shape[0], dtype=torch.long)
            if n > keep:
                merged = self._compress(layer, global_local_score(layer, g, loc), keep, min(self.window, n))
            self.merged.append(merged)
        self._global, self._local = [], []

    def _compress(self, layer: LayerCache, score: torch.Tensor, keep: int, window: int) -> torch.Tensor:
        """Keep `keep` centres per head and merge the rest into them or the zero class; returns how many tokens
        joined a centre, per head."""
        n = layer.n_committed
        kept = select(score, keep, recent=window)  # [kv_heads, keep]
        n_candidates = int(self.merge * (n - keep) + 1e-9)  # 0.29 * 100 is 28.999999999999996
        if n_candidates == 0:
            layer.keep(kept)
            return torch.zeros(kept.shape[0], dtype=torch.long)
        k, v = layer.view()
        rest = score.scatter(1, kept, float("-inf"))  # the non-kept tokens only
        candidates = rest.topk(n_candidates, dim=1).indices  # [kv_heads, m]
        gather = lambda t, idx: t.float().gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        k_kept, v_kept = gather(k, kept), gather(v, kept)
        k_cand, v_cand = gather(k, candidates), gather(v, candidates)
        target, joins = assign_classes(k_cand, k_kept, self.threshold)
        k_new, v_new = merge_into_centres(k_kept, v_kept, score.gather(1, kept), k_cand, v_cand,
                                          score.gather(1, candidates) * joins, target)
        layer.keep(kept)
        k_held, v_held = layer.view()  # the dense form's own buffers (require_writable)
        k_held.copy_(k_new)
        v_held.copy_(v_new)
        return joins.sum(1).cpu()


def global_local_score(layer: LayerCache, global_: AccumulatedAttention, local: WindowVote) -> torch.Tensor:
    """[kv_heads, n]: mean attention received (global) + the window's vote (local), each summing to 1 per head."""
    scores, seen = global_.for_layer(layer)
    return F.normalize(scores / seen.clamp_min(1), p=1, dim=1) + F.normalize(local.for_layer(layer), p=1, dim=1)


def assign_classes(k_cand: torch.Tensor, k_kept: torch.Tensor, threshold: float,
                   chunk: int = SIMILARITY_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate's nearest kept key by cosine similarity, per head, in blocks of candidate rows.

    k_cand: [kv_heads, m, dim]; k_kept: [kv_heads, keep, dim]. Returns (target [kv_heads, m], the index of the
    nearest kept key; joins [kv_heads, m] bool, False for the zero class: best similarity below threshold)."""
    centres = F.normalize(k_kept, dim=-1).transpose(1, 2)
    best, target = [], []
    for start in range(0, k_cand.shape[1], chunk):
        b, t = (F.normalize(k_cand[:, start:start + chunk], dim=-1) @ centres).max(-1)
        best.append(b)
        target.append(t)
    best, target = torch.cat(best, 1), torch.cat(target, 1)
    return target, best >= threshold


def merge_into_centres(k_kept: torch.Tensor, v_kept: torch.Tensor, w_kept: torch.Tensor, k_cand: torch.Tensor,
                       v_cand: torch.Tensor, w_cand: torch.Tensor,
                       target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each centre's key and value as the weighted mean of itself and the candidates whose target it is.

    k/v_kept: [kv_heads, keep, dim], w_kept: [kv_heads, keep]; k/v_cand: [kv_heads, m, dim], w_cand:
    [kv_heads, m] (0 for the zero class: it moves nothing); target: [kv_heads, m]."""
    w_kept = w_kept.clamp_min(1e-12)  # a centre with no score still keeps its own token when nothing joins it
    weight = w_kept.scatter_add(1, target, w_cand)[..., None]  # [kv_heads, keep, 1]
    index = target[..., None].expand(-1, -1, k_kept.shape[-1])
    k_new = (w_kept[..., None] * k_kept).scatter_add(1, index, w_cand[..., None] * k_cand) / weight
    v_new = (w_kept[..., None] * v_kept).scatter_add(1, index, w_cand[..., None] * v_cand) / weight
    return k_new, v_new
