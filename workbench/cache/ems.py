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


@register("cache", "ems")
@dataclass
class EMSPolicy(CachePolicy):
    """EMS: per head, keep the tokens with the best global-local score and merge the next ones into them.

    "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on Global-Local
    Importance" (arXiv 2412.08521). At the end of the prefill, per kv head:
    - global score: the attention a token received from all prompt queries, divided by how many queries could
      see it (accumulated attention alone favours early tokens because of the causal mask); local score: the
      attention of the last `window` queries (SnapKV's vote, which favours recent tokens). Each is normalised
      to sum 1 over the prompt, and the global-local score is their sum;
    - evict then merge: the kept_count(prompt, budget) best tokens stay (the window always among them); of
      the rest, the best `merge` share are merge candidates, the others are evicted outright. Each candidate
      joins the kept token whose key is most similar (cosine); a candidate whose best similarity is below
      `threshold` joins the zero class, which is dropped (the paper's device for merging every head in
      parallel with fixed shapes). Each kept token's key and value become the score-weighted mean of itself
      and the candidates that joined it.
    Prefill only, like SnapKV: tokens generated afterwards are all kept. Merging rewrites stored keys and
    values, so EMS needs the dense storage form (it refuses others). Left out: the paper's fused kernel, its
    head-adaptive choice between evicting and merging (one `merge` share for every head here), and any RoPE
    correction of merged keys (a merged key mixes rotations of nearby positions).
    """

    budget: float = param(0.5, "fraction of the prompt's tokens kept (merged into, not only selected)", min=0.0,
                          max=1.0)
    window: int = param(64, "local window: the last prompt tokens whose queries give the local score", min=1,
                        max=4096)
    merge: float = param(0.5, "share of the evicted tokens merged into kept ones (the best-scored of them)",
                         min=0.0, max=1.0)
    threshold: float = param(0.5, "cosine similarity below which a candidate joins the zero class (dropped)",
                             min=-1.0, max=1.0)
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
        for layer, g, loc in zip(cache.layers, self._global, self._local):
            detach(layer, g)
            detach(layer, loc)
            n = layer.n_committed
            keep = kept_count(n, self.budget)
            if n > keep:
                self._compress(layer, global_local_score(layer, g, loc), keep, min(self.window, n))
        self._global, self._local = [], []

    def _compress(self, layer: LayerCache, score: torch.Tensor, keep: int, window: int) -> None:
        n = layer.n_committed
        kept = select(score, keep, recent=window)  # [kv_heads, keep]
        n_merge = int(self.merge * (n - keep))
        if n_merge == 0:
            layer.keep(kept)
            return
        k, v = layer.view()
        rest = score.scatter(1, kept, float("-inf"))  # evicted tokens only
        candidates = rest.topk(n_merge, dim=1).indices  # [kv_heads, m]
        gather = lambda t, idx: t.float().gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        k_kept, v_kept = gather(k, kept), gather(v, kept)
        k_cand, v_cand = gather(k, candidates), gather(v, candidates)
        similarity = F.normalize(k_cand, dim=-1) @ F.normalize(k_kept, dim=-1).transpose(1, 2)  # [kv_heads, m, keep]
        best, target = similarity.max(-1)
        w_cand = score.gather(1, candidates) * (best >= self.threshold)  # the zero class weighs nothing
        w_kept = score.gather(1, kept).clamp_min(1e-12)
        weight = w_kept.scatter_add(1, target, w_cand)[..., None]  # [kv_heads, keep, 1]
        index = target[..., None].expand(-1, -1, k.shape[-1])
        k_new = (w_kept[..., None] * k_kept).scatter_add(1, index, w_cand[..., None] * k_cand) / weight
        v_new = (w_kept[..., None] * v_kept).scatter_add(1, index, w_cand[..., None] * v_cand) / weight
        layer.keep(kept)
        k_held, v_held = layer.view()  # the dense form's own buffers (require_writable)
        k_held.copy_(k_new)
        v_held.copy_(v_new)


def global_local_score(layer: LayerCache, global_: AccumulatedAttention, local: WindowVote) -> torch.Tensor:
    """[kv_heads, n]: mean attention received (global) + the window's vote (local), each summing to 1 per head."""
    scores, seen = global_.for_layer(layer)
    return F.normalize(scores / seen.clamp_min(1), p=1, dim=1) + F.normalize(local.for_layer(layer), p=1, dim=1)
