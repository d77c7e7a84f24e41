"""What the eviction policies share: budget arithmetic, attention weights computed in chunks, the observer that
accumulates the attention each held token receives, and the selection of sinks + recent + top-scored tokens.

Budget conventions. streaming, h2o and snapkv keep an absolute number of tokens per layer and head, as their
papers do (StreamingLLM: sinks + window; H2O and SnapKV: a cache size), so their memory is bounded whatever the
context length; each also takes `fraction`, which, when above 0, keeps that fraction of the context instead
(`kept_count(n, fraction)` of n tokens, at least one). ems, prefix_kv and double_sparsity take `budget` as that
fraction. Policies that evict during decoding (streaming, h2o) count n as every token seen so far (the last held
position + 1); prefill-only policies (snapkv, ems, prefix_kv) count the prompt. Evicted slots are given back:
the storage forms shrink their buffers to the kept tokens (`DenseLayerCache.fit`). Scores are per kv head: the
attention a key receives is summed over the query heads that share it (grouped-query attention).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from workbench.cache.base import AttentionObserver, CachePolicy, KVCache, LayerCache
from workbench.cache.dense import DenseLayerCache
from workbench.errors import SpecError

QUERY_CHUNK = 256  # query rows per block of attention weights: a long prefill never holds all T x S of them
PER_QUERY_LIMIT = 256  # forwards with up to this many queries keep each query's row until commit()


def kept_count(n: int, budget: float) -> int:
    """Tokens kept of n under `budget` (a fraction in (0, 1]): ceil(budget * n), at least 1, at most n."""
    return min(n, max(1, math.ceil(budget * n - 1e-9)))


def kept_tokens(n: int, budget: int, fraction: float) -> int:
    """Tokens kept of n: `fraction` of them (kept_count) when fraction > 0, else the absolute `budget`, at most n."""
    return kept_count(n, fraction) if fraction > 0 else min(n, budget)


def context_length(layer: LayerCache) -> int:
    """Tokens seen so far by this layer: its newest held position + 1 (eviction never drops the newest)."""
    return int(layer.positions[:, : layer.n_committed].max()) + 1 if layer.n_committed else 0


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                    chunk: int = QUERY_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
    """Softmax attention weights in blocks of query rows, float32, summed over each kv head's query group.

    q: [heads, T, dim]; k: [kv_heads, S, dim]; mask: [T, S] bool or None (causal: query i sees keys up to
    i + S - T, also for the last rows of a prompt). Yields (first row, weights [kv_heads, t, S]), t <= chunk."""
    heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[0], k.shape[1]
    group = heads // kv_heads
    keys = k.float().transpose(1, 2)
    for start in range(0, n_q, chunk):
        rows = q[:, start:start + chunk].float() * dim**-0.5
        t = rows.shape[1]
        scores = (rows.reshape(kv_heads, group * t, dim) @ keys).view(kv_heads, group, t, n_k)
        if mask is None:
            query_pos = torch.arange(start, start + t, device=q.device) + (n_k - n_q)
            visible = torch.arange(n_k, device=q.device)[None, :] <= query_pos[:, None]
        else:
            visible = mask[start:start + t]
        scores.masked_fill_(~visible, float("-inf"))
        yield start, torch.softmax(scores, dim=-1).sum(1)


def align(values: list[torch.Tensor], held: torch.Tensor, now: torch.Tensor) -> list[torch.Tensor]:
    """Per-token values [kv_heads, n] for the tokens at positions `held` [kv_heads, n], cut down to the tokens
    at positions `now` [kv_heads, m] (a subset in every head: another policy evicted some)."""
    if now.shape == held.shape:
        return values  # evictions only shrink a layer, and every commit went through the observer
    index = torch.searchsorted(held.contiguous(), now.contiguous())
    return [v.gather(1, index) for v in values]


class AccumulatedAttention:
    """Observer: `scores` [kv_heads, n] is the attention each committed token received from every committed
    query (H2O's accumulated attention), `seen` [kv_heads, n] how many committed queries could see it (EMS
    divides by it to undo the causal mask's bias towards early tokens), `positions` [kv_heads, n] which tokens.

    A forward's weights wait until commit(offsets) says which of its queries were kept, so rejected drafts,
    self-speculative scratch and lookahead's aux rows never count. A forward of more than PER_QUERY_LIMIT
    queries (a prefill) keeps only the sum over its queries and must be committed whole. Read the scores with
    `for_layer(layer)`: they follow evictions made by any policy, matched by position."""

    def __init__(self) -> None:
        self.scores: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        # (first query's offset among the uncommitted slots, number of queries, weights, visible, key positions):
        # weights [kv_heads, T, S] and visible [T, S] per query, or [kv_heads, 1, S] and [1, S] summed
        self._pending: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._committed_positions: torch.Tensor | None = None  # the layer's committed tokens at observe time

    def observe(self, cache: LayerCache, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        n_q, n_k = q.shape[1], k.shape[1]
        blocks = attention_probs(q, k, mask)
        if n_q <= PER_QUERY_LIMIT:
            if mask is None:
                mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril_(n_k - n_q)
            weights, visible = torch.cat([b for _, b in blocks], 1), mask
        else:  # a prompt: the sum over its queries, and how many of them see each key (causal: no T x S mask)
            weights = sum(b.sum(1, keepdim=True) for _, b in blocks)
            first_seer = (torch.arange(n_k, device=q.device) - (n_k - n_q)).clamp_min(0)
            visible = (n_q - first_seer)[None] if mask is None else mask.sum(0, keepdim=True)
        positions = cache.positions
        self._committed_positions = positions[:, : cache.n_committed]
        self._pending.append((n_k - n_q - cache.n_committed, n_q, weights, visible, positions))

    def commit(self, offsets: list[int]) -> None:
        pending, self._pending = self._pending, []
        if not offsets or not pending:
            return
        if self.scores is not None:
            self.scores, self.seen = align([self.scores, self.seen], self.positions, self._committed_positions)
        n = self._committed_positions.shape[1]
        width = n + max(offsets) + 1
        kept = set(offsets)
        add = seen = None
        for first, n_q, weights, visible, _ in pending:
            if visible.shape[0] == n_q:  # one row per query: only the kept queries count
                rows = torch.tensor([first + i in kept for i in range(n_q)], device=weights.device)
                w, v = weights[:, rows].sum(1), visible[rows].sum(0)
            elif all(first + i in kept for i in range(n_q)):
                w, v = weights[:, 0], visible[0]
            else:
                raise RuntimeError(f"a forward of more than {PER_QUERY_LIMIT} queries must be committed whole")
            w = F.pad(w, (0, width - w.shape[-1]))
            v = F.pad(v.float(), (0, width - v.shape[-1]))
            add, seen = (w, v) if add is None else (add + w, seen + v)
        index = torch.cat([torch.arange(n), n + torch.tensor(offsets)]).to(add.device)
        old_scores = add.new_zeros(add.shape[0], n) if self.scores is None else self.scores
        old_seen = add.new_zeros(add.shape[0], n) if self.seen is None else self.seen
        self.scores = (F.pad(old_scores, (0, width - n)) + add)[:, index]
        self.seen = (F.pad(old_seen, (0, width - n)) + seen)[:, index]
        self.positions = max((p[4] for p in pending), key=lambda t: t.shape[1])[:, index.to(pending[0][4].device)]

    def for_layer(self, layer: LayerCache) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, seen) [kv_heads, n_committed] for the tokens the layer holds now."""
        self.scores, self.seen = align([self.scores, self.seen], self.positions,
                                       layer.positions[:, : layer.n_committed])
        self.positions = layer.positions[:, : layer.n_committed].clone()
        return self.scores, self.seen


class _Observers:
    """Several policies' observers on one layer (e.g. h2o after snapkv): each sees every call."""

    def __init__(self, observers: list[AttentionObserver]):
        self.observers = observers

    def observe(self, cache, q, k, mask) -> None:
        for o in self.observers:
            o.observe(cache, q, k, mask)

    def commit(self, offsets: list[int]) -> None:
        for o in self.observers:
            o.commit(offsets)


def attach_each(cache, make):
    """Attach a fresh observer `make()` to every layer of `cache`; returns them in layer order."""
    observers = [make() for _ in cache.layers]
    for layer, observer in zip(cache.layers, observers):
        attach(layer, observer)
    return observers


def attach(layer: LayerCache, observer: AttentionObserver) -> None:
    """Add an observer to a layer, beside any another policy attached."""
    if layer.observer is None:
        layer.observer = observer
    elif isinstance(layer.observer, _Observers):
        layer.observer.observers.append(observer)
    else:
        layer.observer = _Observers([layer.observer, observer])


def select(scores: torch.Tensor, keep: int, sinks: int = 0, recent: int = 0) -> torch.Tensor:
    """Slots to keep per head: the first `sinks`, the last `recent`, and the top-scored of the rest.

    scores: [kv_heads, n]; returns [kv_heads, keep] ascending slot indices."""
    kv_heads, n = scores.shape
    sinks = min(sinks, keep)
    recent = min(recent, keep - sinks)
    middle = keep - sinks - recent
    fixed = torch.cat([torch.arange(sinks), torch.arange(n - recent, n)]).to(scores.device)
    if middle <= 0:
        return fixed.expand(kv_heads, -1).contiguous()
    candidates = scores[:, sinks:n - recent]
    top = candidates.topk(middle, dim=1, sorted=False).indices + sinks
    return torch.cat([fixed.expand(kv_heads, -1), top], 1).sort(dim=1).values


def require_writable(policy: str, cache: KVCache) -> None:
    """Policies that rewrite stored keys and values (EMS's merge) need the dense storage form."""
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, DenseLayerCache):
            raise SpecError(f"{policy} merges evicted tokens into kept ones, which rewrites stored keys and "
                            f"values; layer {i} holds {type(layer).__name__}, which cannot be rewritten. Put "
                            f"{policy} with the dense cache (or double_sparsity), or use an eviction policy that "
                            f"only drops tokens (h2o, snapkv, streaming) before a compressed form")


def detach(layer: LayerCache, observer: AttentionObserver) -> None:
    """Remove an observer attach() added (prefill-only policies stop scoring once they have evicted)."""
    if layer.observer is observer:
        layer.observer = None
    elif isinstance(layer.observer, _Observers) and observer in layer.observer.observers:
        layer.observer.observers.remove(observer)
        if len(layer.observer.observers) == 1:
            layer.observer = layer.observer.observers[0]


def check_budget(budget: float) -> None:
    if not 0 < budget <= 1:
        raise ValueError(f"budget={budget} must be in (0, 1]: the fraction of the context's tokens kept")


class WindowVote:
    """Observer for the prefill: the attention the last `window` queries pay every key (SnapKV's observation
    window), summed over the window and over each kv head's query group. Set when the prompt (one forward,
    committed whole) is committed; read it with `for_layer(layer)`, which follows evictions by position."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.votes: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def observe(self, cache: LayerCache, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        n_q = q.shape[1]
        w = min(self.window, n_q)
        rows = None if mask is None else mask[n_q - w:]
        votes = sum(p.sum(1) for _, p in attention_probs(q[:, n_q - w:], k, rows))
        self._pending = (votes, cache.positions.clone())

    def commit(self, offsets: list[int]) -> None:
        if offsets and self._pending is not None:
            self.votes, self.positions = self._pending
        self._pending = None

    def for_layer(self, layer: LayerCache) -> torch.Tensor:
        """votes [kv_heads, n_committed] for the tokens the layer holds now."""
        (votes,) = align([self.votes], self.positions, layer.positions[:, : layer.n_committed])
        return votes


class BudgetEviction(CachePolicy):
    """Base of the policies that enforce their budget once the prompt is in and, when `continuous`, after every
    decoding step (StreamingLLM, H2O). Subclasses declare `fraction` and `continuous`, say their absolute budget
    in `absolute()` and implement `evict(cache)`."""

    fraction: float
    continuous: bool

    def absolute(self) -> int:
        raise NotImplementedError

    def kept(self, context: int) -> int:
        """Tokens a layer keeps after `context` tokens seen."""
        return kept_tokens(context, self.absolute(), self.fraction)

    def warnings(self, prompt_tokens: int, new_tokens: int) -> list[str]:
        if self.fraction:
            return []
        reach = prompt_tokens + (new_tokens if self.continuous else 0)
        if reach <= self.absolute():
            what = (f"the prompt's {prompt_tokens} tokens + {new_tokens} new" if self.continuous
                    else f"the prompt's {prompt_tokens} tokens (continuous=false)")
            return [f"{self.technique_name}: its budget of {self.absolute()} tokens is at least {what}, so this run "
                    "evicts nothing and keeps the full cache; give a smaller budget (or fraction=) to see it evict"]
        return []

    def on_cache_built(self, cache: KVCache) -> None:
        """An absolute budget enforced while decoding bounds every layer at the budget plus one step's spare slots
        once the prompt is in: dense buffers are cut to that before the prefill (a longer prompt grows them for
        the prefill and the eviction after it shrinks them back), so memory never follows max_new_tokens."""
        if self.continuous and not self.fraction:
            for layer in cache.layers:
                if isinstance(layer, DenseLayerCache):
                    layer.limit(self.absolute() + layer.spare)

    def on_prefill_end(self, cache: KVCache) -> None:
        self.evict(cache)

    def on_step_end(self, cache: KVCache) -> None:
        if self.continuous:
            self.evict(cache)

    def evict(self, cache: KVCache) -> None:
        raise NotImplementedError
