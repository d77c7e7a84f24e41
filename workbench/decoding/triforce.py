"""TriForce: hierarchical speculative decoding for long contexts, drafted by the target over a retrieved cache.

Paper: Sun et al., "TriForce: Lossless Acceleration of Long Sequence Generation with Hierarchical Speculative
Decoding", arXiv 2404.11912. At length the KV cache, not the weights, is what a decode step reads most, so the
target itself, attending only to a small *retrieval cache* of its own KV, is a cheap and faithful drafter; a
still cheaper drafter drafts for that one. Two levels here:

1. Retrieval cache (sec. 4.1): the committed context is cut into chunks of `chunk` tokens; each chunk is
   scored per KV head by its mean key against the query of the last verification (the mean of its rows' queries
   over the head's query group); the best chunks fill `budget` tokens, with the first chunk (attention sinks)
   and the last `window` tokens always kept. It is rebuilt every `refresh` steps; in between, newly committed
   tokens are appended. Chunk means are computed once per chunk, so a rebuild never rereads the whole cache.
2. Hierarchy (sec. 4.2): prompt lookup (an n-gram index of prompt and output) proposes up to `lookup` tokens to
   the target-on-the-retrieval-cache, which checks them in one forward and keeps the ones it agrees with (plus
   its own next token); this repeats until `k` tokens are drafted. Under sampling the middle level accepts a
   looked-up token g with probability q(g) and otherwise draws from q without g (renormalised), so every
   drafted token is drawn from the middle level's own distribution q, which is recorded for the target's
   speculative acceptor.
3. The target verifies the chain over its full cache, so greedy output is plain decoding's and sampled output
   follows the target's distribution.

Left out: the paper's bottom level is a small model with a StreamingLLM cache (here an n-gram lookup, which
needs no second model); its retrieval cache is rebuilt from the last query on a GPU each step with chunk
selection shared by a layer's heads, and drafts of the middle level are themselves verified by a chain with
rejection sampling of a small model's q. No offloading of the full cache (the paper's second setting).
Works with every cache policy: the retrieval cache is gathered from what the policy holds (`view()`), and chunk
means are recomputed when the policy evicts or moves keys; a policy that scores attention keeps its observer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.cache.base import KVCache
from workbench.cache.dense import DenseLayerCache
from workbench.decoding.base import Drafter, DraftTree
from workbench.decoding.ngram_index import NgramIndex
from workbench.registry import param, register


class _QueryTap:
    """Attention observer on a target layer: keeps the mean query of the last forward per KV head [kv, dim]."""

    def __init__(self, group: int, inner=None):
        self.group = group
        self.inner = inner  # a cache policy's own observer (h2o, snapkv...), still fed
        self.query: torch.Tensor | None = None

    def observe(self, cache, q: torch.Tensor, k: torch.Tensor, mask) -> None:
        heads, _, dim = q.shape  # q: [heads, T, dim]
        self.query = q.float().mean(1).view(heads // self.group, self.group, dim).mean(1)
        if self.inner is not None:
            self.inner.observe(cache, q, k, mask)

    def commit(self, offsets: list[int]) -> None:
        if self.inner is not None:
            self.inner.commit(offsets)


@register("decoding", "triforce", lossless=True)
@dataclass
class TriForce(Drafter):
    """Hierarchical drafting for long contexts: n-gram lookup drafts for the target on a retrieved slice of its
    own KV cache, which drafts a chain for the full target."""

    default_acceptor = "speculative"
    draft_distribution = True  # every tree carries its draft distribution q

    k: int = param(8, "tokens the retrieval-cache level drafts per step (TriForce's gamma2)", min=1, max=32)
    lookup: int = param(4, "tokens prompt lookup proposes to the retrieval-cache level per forward (gamma1)",
                        min=0, max=16)
    budget: int = param(1024, "tokens in the retrieval cache (chunks, sinks and the recent window)", min=2)
    chunk: int = param(16, "tokens per retrieved chunk", min=1, max=256)
    window: int = param(64, "most recent tokens always in the retrieval cache", min=1)
    refresh: int = param(4, "rebuild the retrieval cache every this-many steps (new tokens are appended in between)",
                         min=1, max=256)
    max_ngram: int = param(3, "longest n-gram prompt lookup matches", min=1, max=8)
    prefer: str = param("first", "which earlier occurrence of the n-gram prompt lookup copies from: the first, or "
                        "the latest (which follows the output's own repetitions)", choices=["first", "recent"])
    retrieval_tokens: int = field(init=False, default=0)  # tokens the retrieval cache held at the last rebuild
    _cache: KVCache | None = field(init=False, default=None, repr=False)  # the retrieval cache
    _taps: list[_QueryTap] = field(init=False, default_factory=list, repr=False)
    _means: list[torch.Tensor] = field(init=False, default_factory=list, repr=False)  # [kv, chunks, dim] per layer
    _ends: list = field(init=False, default_factory=list, repr=False)  # per layer: position of the last key averaged
    _synced: int = field(init=False, default=0)  # committed target tokens the retrieval cache has seen
    _index: NgramIndex = field(init=False, default_factory=lambda: NgramIndex(1, 1), repr=False)
    _generator: torch.Generator | None = field(init=False, default=None, repr=False)

    def check(self) -> None:
        if self.window + self.chunk > self.budget:
            raise ValueError(f"budget ({self.budget}) must hold the window ({self.window}) and one chunk "
                             f"({self.chunk})")

    def begin(self, state) -> None:
        cfg = state.model.config
        group = cfg.num_heads // cfg.num_kv_heads
        self._taps = [_QueryTap(group, layer.observer) for layer in state.cache.layers]
        for layer, tap in zip(state.cache.layers, self._taps):
            layer.observer = tap
        self._means = [torch.empty(0)] * len(self._taps)
        self._ends = [None] * len(self._taps)
        self._cache, self._synced = None, 0
        self._index = NgramIndex(1, self.max_ngram)
        self._generator = torch.Generator(device=state.model.device).manual_seed(state.sampler.seed + 1)

    # -- level 1: the retrieval cache -----------------------------------------------------------------------

    def _chunk_means(self, i: int, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[kv, full chunks, dim] mean key of every full chunk of layer i, extending the ones already computed
        (recomputed when a cache policy evicted or moved the keys they were averaged over)."""
        have = self._means[i].shape[1] if self._means[i].dim() == 3 else 0
        if have and (keys.shape[1] < have * self.chunk or
                     not torch.equal(pos[:, have * self.chunk - 1], self._ends[i])):
            self._means[i] = torch.empty(0)
        if self._means[i].dim() != 3:
            self._means[i] = keys.new_zeros(keys.shape[0], 0, keys.shape[2], dtype=torch.float32)
        have, full = self._means[i].shape[1], keys.shape[1] // self.chunk
        if full > have:
            new = keys[:, have * self.chunk: full * self.chunk].float()
            new = new.view(keys.shape[0], full - have, self.chunk, keys.shape[2]).mean(2)
            self._means[i] = torch.cat([self._means[i], new], 1)
            self._ends[i] = pos[:, full * self.chunk - 1].clone()
        return self._means[i]

    def _rebuild(self, state) -> None:
        """The retrieval cache from the target's committed KV: sinks, the best chunks per KV head, the window."""
        layers = []
        for i, (layer, tap) in enumerate(zip(state.cache.layers, self._taps)):
            keys, values = layer.view()
            n = layer.n_committed
            keys, values, pos = keys[:, :n], values[:, :n], layer.positions[:, :n]
            chunks = min(max(n - self.window, 0) // self.chunk, self._chunk_means(i, keys, pos).shape[1])
            picks = min(chunks, (self.budget - self.window) // self.chunk)
            # the query of the last verification; before the first one, the recent window's mean key stands in
            query = tap.query if tap.query is not None else keys[:, -self.window:].float().mean(1)
            scores = torch.einsum("hcd,hd->hc", self._means[i][:, :chunks], query)
            scores[:, :1] = float("inf")  # the first chunk holds the attention sinks: always kept
            best = scores.topk(picks, dim=1).indices.sort(dim=1).values  # [kv, picks]
            chosen = (best[:, :, None] * self.chunk + torch.arange(self.chunk, device=best.device)).flatten(1)
            # the window, and what follows
            tail = torch.arange(chunks * self.chunk, n, device=keys.device).expand(keys.shape[0], -1)
            slots = torch.cat([chosen, tail], 1)
            index = slots[:, :, None].expand(-1, -1, keys.shape[2])
            cache = DenseLayerCache(keys.shape[0], keys.shape[2], keys.dtype, keys.device,
                                    slots.shape[1] + self.refresh * (self.k + 1) + self.k + 1)
            cache.append(keys.gather(1, index), values.gather(1, index), pos.gather(1, slots))
            cache.n_committed = cache.length
            layers.append(cache)
        self._cache, self._synced = KVCache(layers), state.cache.layers[0].n_committed
        self.retrieval_tokens = layers[0].length

    def _sync(self, state) -> None:
        """Append the target's tokens committed since the last sync to the retrieval cache."""
        n = state.cache.layers[0].n_committed
        for layer, mine in zip(state.cache.layers, self._cache.layers):
            keys, values = layer.view()
            mine.append(keys[:, self._synced:n], values[:, self._synced:n], layer.positions[:, self._synced:n])
            mine.n_committed = mine.length
        self._synced = n

    # -- level 0: prompt lookup ------------------------------------------------------------------------------

    def _lookup(self, committed: list[int], drafted: list[int]) -> list[int]:
        """Up to `lookup` tokens that followed an earlier occurrence (the first, or the latest with
        prefer=recent) of the last n-gram of committed + drafted (n from max_ngram down to 1) in the committed
        tokens (prompt, output and the pending token)."""
        if not self.lookup:
            return []
        self._index.update(committed)
        found = self._index.match(committed[-self.max_ngram:] + drafted, self.prefer)
        if found is None:
            return []
        n, start = found
        return committed[start + n: start + n + min(self.lookup, self.k - len(drafted))]

    # -- level 2: draft the chain for the target ---------------------------------------------------------------

    def propose(self, state) -> DraftTree:
        if self._cache is None or state.step % self.refresh == 0:
            self._rebuild(state)
        else:
            self._sync(state)
        model, sampler, device = state.model, state.sampler, state.model.device
        base = self._cache.layers[0].length
        committed, drafted, dists = state.tokens, [], []
        last, position = state.pending, state.pending_position
        while len(drafted) < self.k:
            guesses = self._lookup(committed, drafted)
            chain = DraftTree.chain(guesses)
            out = model(torch.tensor([last, *guesses], device=device),
                        torch.tensor(chain.position_ids(position), device=device), self._cache,
                        mask=chain.attention_mask(device))
            probs = sampler.probs(out.logits)  # [1 + guesses, vocab]
            kept = 0
            for row in range(len(guesses) + 1):
                q = probs[row]
                token = self._draw(q, guesses[row] if row < len(guesses) else None, sampler.greedy)
                drafted.append(token)
                dists.append(q)
                if row == len(guesses) or token != guesses[row] or len(drafted) == self.k:
                    break
                kept += 1
            self._cache.commit(list(range(kept + 1)))  # the forward's first kept+1 rows are on the draft path
            last, position = drafted[-1], position + kept + 1
        for layer in self._cache.layers:
            layer.truncate(base)
            layer.n_committed = base
        return DraftTree.chain(drafted, torch.stack(dists))

    def _draw(self, q: torch.Tensor, guess: int | None, greedy: bool) -> int:
        """A token drawn from q (argmax when greedy). A looked-up guess g is kept with probability q(g), else the
        draw is from q without g: the result is distributed as q either way."""
        if greedy:
            return int(q.argmax())
        if guess is not None:
            if float(torch.rand((), generator=self._generator, device=q.device)) < float(q[guess]):
                return guess
            q = q.clone()
            q[guess] = 0
            if float(q.sum()) <= 0:
                return guess
        return int(torch.multinomial(q, 1, generator=self._generator))
