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
2. Hierarchy (sec. 4.2): the bottom level proposes a small tree of guesses to the target-on-the-retrieval-cache,
   which checks them in one forward and keeps the path it agrees with (plus its own next token); this repeats
   until `k` tokens are drafted. Its two branches of up to `lookup` tokens: prompt lookup (an n-gram index of
   prompt and output), and with `recycle` the chain of *recycled successors* (Token Recycling's matrix at k=1:
   each token's most likely next token in the newest target or middle-level forward that ran it), which drafts
   where the output repeats itself rather than the prompt. Under sampling the middle level tries the guesses
   under a node in turn, keeping guess g with probability q(g) renormalised over what is left, else draws from
   the rest (SpecInfer's multi-candidate scheme), so every drafted token is drawn from the middle level's own
   distribution q, which is recorded for the target's speculative acceptor.
   An addition to the paper (`confidence`, as adaptive draft lengths do): drafting stops after a token that no
   guess backed and the middle level gives less than `confidence`, since the target mostly rejects those.
3. The target verifies the chain over its full cache, so greedy output is plain decoding's and sampled output
   follows the target's distribution.

Left out: the paper's bottom level is a small model with a StreamingLLM cache (here lookup and recycling, which
need no second model); its retrieval cache is rebuilt from the last query on a GPU each step with chunk
selection shared by a layer's heads, and drafts of the middle level are themselves verified by a chain with
rejection sampling of a small model's q. No offloading of the full cache (the paper's second setting).
Works with every cache policy: the retrieval cache is gathered from what the policy holds (`view()`), and chunk
means are recomputed when the policy evicts or moves keys; a policy that scores attention keeps its observer.
The target's queries are tapped (an attention observer) only in the verification before a rebuild: an observed
layer cannot run in the CPU kernels' one-call layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.cache.base import KVCache
from workbench.cache.dense import DenseLayerCache
from workbench.decoding.base import ROOT, Drafter, DraftTree
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


def _rows(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[heads, len(slots[h]), dim]: each head's rows at its slots (index_select per head copies whole rows, about
    six times faster here than a gather over an expanded index)."""
    return torch.stack([x[h].index_select(0, slots[h]) for h in range(x.shape[0])])


@register("decoding", "triforce", lossless=True)
@dataclass
class TriForce(Drafter):
    """Hierarchical drafting for long contexts: n-gram lookup and recycled successors draft for the target on a
    retrieved slice of its own KV cache, which drafts a chain for the full target."""

    default_acceptor = "speculative"
    draft_distribution = True  # every tree carries its draft distribution q

    k: int = param(8, "tokens the retrieval-cache level drafts per step (TriForce's gamma2)", min=1, max=32)
    lookup: int = param(4, "tokens each branch of the bottom level (prompt lookup, recycled successors) proposes to "
                           "the retrieval-cache level per forward (gamma1); 0: none", min=0, max=16)
    budget: int = param(1024, "tokens in the retrieval cache (chunks, sinks and the recent window)", min=2)
    chunk: int = param(16, "tokens per retrieved chunk", min=1, max=256)
    window: int = param(64, "most recent tokens always in the retrieval cache", min=1)
    refresh: int = param(4, "rebuild the retrieval cache every this-many steps (new tokens are appended in between)",
                         min=1, max=256)
    max_ngram: int = param(3, "longest n-gram prompt lookup matches", min=1, max=8)
    prefer: str = param("first", "which earlier occurrence of the n-gram prompt lookup copies from: the first, or "
                        "the latest (which follows the output's own repetitions)", choices=["first", "recent"])
    recycle: bool = param(True, "beside prompt lookup's copy, guess the chain of recycled successors: the most likely "
                                "token last seen after each token (in the target's and the retrieval-cache level's "
                                "own forwards)")
    confidence: float = param(0.4, "stop drafting after a token that no guess backed and the retrieval-cache level "
                                   "gives less than this probability (0: always draft k)", min=0.0, max=1.0)
    retrieval_tokens: int = field(init=False, default=0)  # tokens the retrieval cache held at the last rebuild
    _cache: KVCache | None = field(init=False, default=None, repr=False)  # the retrieval cache
    _taps: list[_QueryTap] = field(init=False, default_factory=list, repr=False)
    _means: list[torch.Tensor] = field(init=False, default_factory=list, repr=False)  # [kv, chunks, dim] per layer
    _ends: list = field(init=False, default_factory=list, repr=False)  # per layer: position of the last key averaged
    _synced: int = field(init=False, default=0)  # committed target tokens the retrieval cache has seen
    _index: NgramIndex = field(init=False, default_factory=lambda: NgramIndex(1, 1), repr=False)
    _next: list[int] = field(init=False, default_factory=list, repr=False)  # token -> its recycled successor, or -1
    _generator: torch.Generator | None = field(init=False, default=None, repr=False)

    def check(self) -> None:
        if self.window + self.chunk > self.budget:
            raise ValueError(f"budget ({self.budget}) must hold the window ({self.window}) and one chunk "
                             f"({self.chunk})")

    def begin(self, state) -> None:
        cfg = state.model.config
        group = cfg.num_heads // cfg.num_kv_heads
        self._taps = [_QueryTap(group, layer.observer) for layer in state.cache.layers]
        self._means = [torch.empty(0)] * len(self._taps)
        self._ends = [None] * len(self._taps)
        self._cache, self._synced = None, 0
        self._index = NgramIndex(1, self.max_ngram)
        self._next = [-1] * cfg.vocab_size
        self._generator = torch.Generator(device=state.model.device).manual_seed(state.sampler.seed + 1)

    def _listen(self, state, on: bool) -> None:
        """Tap the target's queries, or stop. Only the verification before a rebuild is tapped: a layer with an
        observer leaves the CPU kernels' one-call layers (a 9-row verification at 7k: 45 ms against 36)."""
        for layer, tap in zip(state.cache.layers, self._taps):
            layer.observer = tap if on else tap.inner

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
            cache = DenseLayerCache(keys.shape[0], keys.shape[2], keys.dtype, keys.device,
                                    slots.shape[1] + self.refresh * (self.k + 1) + self.k + 1)
            cache.append(_rows(keys, slots), _rows(values, slots), pos.gather(1, slots))
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

    # -- level 0: prompt lookup and recycled successors ----------------------------------------------------------------

    def _guesses(self, committed: list[int], drafted: list[int]) -> DraftTree:
        """What the bottom level proposes to the retrieval-cache level: a tree of up to two branches of `lookup`
        tokens each (a shared start merged), from the pending or last drafted token.
        - Prompt lookup: the tokens that followed an earlier occurrence (the first, or the latest with
          prefer=recent) of the last n-gram of committed + drafted (n from max_ngram down to 1) in the committed
          tokens (prompt, output and the pending token).
        - With `recycle`: the chain of recycled successors, each token's newest most likely next token."""
        limit = min(self.lookup, self.k - len(drafted))
        branches = []
        if limit:
            self._index.update(committed)
            found = self._index.match(committed[-self.max_ngram:] + drafted, self.prefer)
            if found is not None:
                branches.append(committed[found[1] + found[0]: found[1] + found[0] + limit])
        if limit and self.recycle:
            chain, last = [], (drafted or committed)[-1]
            while len(chain) < limit and self._next[last] >= 0:
                last = self._next[last]
                chain.append(last)
            branches.append(chain)
        return DraftTree.trie(branches)

    def _recycle(self, inputs: list[int], logits: torch.Tensor) -> None:
        """Token Recycling's matrix at k=1: each input token's newest most likely successor (row i of logits is
        the distribution after inputs[i])."""
        if self.recycle:
            for token, successor in zip(inputs, logits.argmax(-1).tolist()):
                self._next[token] = successor

    def observe(self, state, tree, acceptance, logits) -> None:
        self._recycle([tree.root, *tree.tokens], logits[: len(tree) + 1])

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
        unsure = False
        while len(drafted) < self.k and not unsure:
            guesses = self._guesses(committed, drafted)
            out = model(torch.tensor([last, *guesses.tokens], device=device),
                        guesses.positions(position, device), self._cache, mask=guesses.attention_mask(device))
            probs = sampler.probs(out.logits)  # [1 + guesses, vocab]: row i + 1 follows guess i
            self._recycle([last, *guesses.tokens], out.logits)
            children, node, path = guesses.children(), ROOT, [0]  # path: the forward's rows on the draft path
            while True:
                q = probs[node + 1]
                options = {guesses.tokens[c]: c for c in children[node]}
                token = self._draw(q, list(options), sampler.greedy)
                drafted.append(token)
                dists.append(q)
                unsure = token not in options and float(q[token]) < self.confidence  # no guess backs it
                if token not in options or len(drafted) == self.k or unsure:
                    break
                node = options[token]
                path.append(node + 1)
            self._cache.commit(path)
            last, position = drafted[-1], position + len(path)
        for layer in self._cache.layers:
            layer.truncate(base)
            layer.n_committed = base
        self._listen(state, (state.step + 1) % self.refresh == 0)  # the next step rebuilds from this one's queries
        return DraftTree.chain(drafted, torch.stack(dists))

    def _draw(self, q: torch.Tensor, guesses: list[int], greedy: bool) -> int:
        """A token drawn from q (argmax when greedy). The guesses are tried in turn, each kept with its
        probability under q without the guesses already refused (renormalised); then the draw is from what is
        left. The result is distributed as q whatever the guesses (SpecInfer's multi-candidate scheme with
        deterministic candidates)."""
        if greedy:
            return int(q.argmax())
        for guess in guesses:
            if float(torch.rand((), generator=self._generator, device=q.device)) < float(q[guess]):
                return guess
            q = q.clone()
            q[guess] = 0
            total = float(q.sum())
            if total <= 0:
                return guess
            q /= total
        return int(torch.multinomial(q, 1, generator=self._generator))
