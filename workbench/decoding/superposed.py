"""Superposed Decoding: k drafts from one autoregressive pass over a superposition of their embeddings. LOSSY.

Paper: Shen et al., "Superposed Decoding: Multiple Generations from a Single Autoregressive Inference Pass"
(arXiv 2405.18400). Instead of running the model once per draft, each decoding step feeds the model ONE input:
the weighted sum of the k drafts' most recent token embeddings, weights proportional to the drafts'
probabilities (gamma_i = p_i / sum_j p_j). The single next-token distribution is shared by all drafts; to keep
each draft coherent it is interpolated with an n-gram model conditioned on that draft's own last tokens,
p_i(y) = (1 - alpha) p_LM(y) + alpha p_ngram(y | draft i). Every draft is extended by its top k tokens under
p_i, and the k most likely of the k^2 extensions are kept.

In the engine loop: each step drafts `length` tokens after the pending token this way, one superposed forward
per position (on the cache's scratch region, rolled back), `layers` of the target's first layers deep (0: the
whole model, as in the paper). The k drafts go to the target as one tree (shared prefixes merged, drafts in
rank order), and the `superposed` acceptor commits one whole draft unchecked: by default the draft the target
scores highest (sum of its log-probabilities), or the top-ranked draft (`pick=top`); the target then writes
the token after it. The n-gram model is built from the run's own context (prompt and output so far), orders
`ngram` down to 2 with backoff to the longest match; where no order matches, p_i is p_LM alone.

Left out: the paper's n-gram models built from a large corpus (none ships with the workbench; the context
stands in), and returning all k drafts to the user (one output per run here; the others are visible as the
tree's rejected branches).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from workbench.decoding.base import ROOT, Acceptance, Acceptor, Drafter, DraftTree
from workbench.errors import SpecError
from workbench.registry import param, register
from workbench.sampling import Sampler, argmax_rows


@register("decoding", "superposed", lossless=False)
@dataclass
class SuperposedDrafter(Drafter):
    """k drafts from one forward per position over a probability-weighted superposition of their token
    embeddings, kept coherent by a context n-gram model; one draft is committed unchecked (lossy)."""

    default_acceptor = "superposed"
    k: int = param(3, "drafts decoded together", min=1, max=16)
    length: int = param(4, "tokens per draft each step", min=1, max=32)
    alpha: float = param(0.5, "weight of the n-gram model in each draft's distribution", min=0.0, max=1.0)
    ngram: int = param(4, "longest n-gram order of the context model (backs off to 2)", min=2, max=8)
    layers: int = param(0, "how many of the target's first layers run the superposed passes (0: all, the paper)",
                        min=0)
    _counts: dict = field(default_factory=lambda: defaultdict(Counter), init=False, repr=False)
    _indexed: int = field(default=0, init=False, repr=False)  # tokens of the context counted so far

    def begin(self, state) -> None:
        self._counts, self._indexed = defaultdict(Counter), 0

    def check_run(self, model, prompt_tokens: int) -> None:
        if self.layers > model.config.num_layers:
            raise SpecError(f"superposed: layers={self.layers} but the model has {model.config.num_layers} layers; "
                            f"use 0 (all) to {model.config.num_layers}")

    def propose(self, state) -> DraftTree:
        self._index(state.tokens)
        model, cache = state.model, state.cache
        plan = list(range(self.layers)) if self.layers else None
        device = model.device
        drafts: list[list[int]] = [[]]
        scores = torch.zeros(1)  # log-probability of each draft
        for i in range(self.length):
            last = torch.tensor([d[-1] if d else state.pending for d in drafts], device=device)
            weights = torch.softmax(scores, dim=0).to(device)  # gamma_i = p_i / sum_j p_j
            embeds = (weights[:, None] * model.embed(last).float()).sum(0, keepdim=True)  # [1, hidden]
            out = model(last[:1], torch.tensor([state.pending_position + i], device=device), cache, layers=plan,
                        embeds=embeds)
            p_lm = torch.softmax(out.logits[0].float(), dim=-1).cpu()
            options = []  # (score, draft index, token) of every extension
            for d, draft in enumerate(drafts):
                p = self._interpolate(p_lm, state.tokens + draft)
                top = torch.topk(p, self.k)
                options += [(float(scores[d]) + v, d, t) for v, t in zip(top.values.log().tolist(),
                                                                          top.indices.tolist())]
            options.sort(key=lambda o: -o[0])
            kept = options[: self.k]
            drafts = [drafts[d] + [t] for _, d, t in kept]
            scores = torch.tensor([s for s, _, _ in kept])
        cache.rollback()
        return DraftTree.trie(drafts)

    def _index(self, tokens: list[int]) -> None:
        """Count the n-grams (orders 2..ngram) that end in tokens not yet counted."""
        for end in range(max(self._indexed, 1), len(tokens)):
            for n in range(2, self.ngram + 1):
                if end - n + 1 >= 0:
                    self._counts[tuple(tokens[end - n + 1: end])][tokens[end]] += 1
        self._indexed = len(tokens)

    def _interpolate(self, p_lm: torch.Tensor, context: list[int]) -> torch.Tensor:
        """(1 - alpha) p_LM + alpha p_ngram, p_ngram from the longest order whose context was seen."""
        for n in range(self.ngram, 1, -1):
            seen = self._counts.get(tuple(context[len(context) - n + 1:])) if len(context) >= n - 1 else None
            if seen:
                total = sum(seen.values())
                p = p_lm * (1 - self.alpha)
                p[list(seen)] += torch.tensor([c / total for c in seen.values()]) * self.alpha
                return p
        return p_lm


@register("acceptance", "superposed", lossless=False)
@dataclass
class SuperposedAcceptance(Acceptor):
    """Commit one whole root-to-leaf draft unchecked, the one the target scores highest or the drafter's top one
    (lossy); the target writes the token after it."""

    default_drafter = "superposed"
    lossless = False
    pick: str = param("target", "target: the draft with the highest sum of target log-probabilities; top: the "
                      "drafter's top-ranked draft (the tree's first leaf)", choices=("target", "top"))

    def accept(self, tree: DraftTree, logits: torch.Tensor, probs: torch.Tensor, sampler: Sampler) -> Acceptance:
        leaf = ROOT
        if len(tree):
            children = tree.children()
            leaves = [n for n in range(len(tree)) if not children[n]]
            if self.pick == "top":
                leaf = leaves[0]
            else:
                rows = torch.tensor([p + 1 for p in tree.parents])
                logp = torch.log_softmax(logits.float(), dim=-1)[rows, torch.tensor(tree.tokens)].tolist()
                path_logp: list[float] = []
                for node, parent in enumerate(tree.parents):
                    path_logp.append(logp[node] + (path_logp[parent] if parent != ROOT else 0.0))
                leaf = max(leaves, key=path_logp.__getitem__)  # ties: the first, the drafter's higher-ranked
        accepted = []
        node = leaf
        while node != ROOT:
            accepted.append(node)
            node = tree.parents[node]
        accepted.reverse()
        row = leaf + 1
        bonus = argmax_rows(logits[row:row + 1])[0] if sampler.greedy else int(sampler.draw(probs[row]))
        return Acceptance(accepted, bonus)
