"""Prompt lookup decoding: draft by copying what followed the last n-gram's earlier occurrence.

Papers: Prompt Lookup Decoding (Saxena, 2023) and Input-guided Aggressive Decoding (Sun et al., 2021,
arXiv 2106.04970). When the output repeats spans of the input (summaries, edits, retrieval answers), the
tokens that followed an earlier occurrence of the current n-gram are a good guess for what comes next.
Each step: for n from `max_ngram` down to `min_ngram`, look up the last n tokens among all earlier
positions of prompt and output; on the first n that matches, propose the (up to) `k` tokens that followed
the match as a chain. The target verifies them, so the output is exactly plain decoding's.

An index from each n-gram to its occurrences is kept up to date as tokens are committed, so a lookup costs
O(1) instead of a scan. The draft length is sized for CPUs, where every verified row costs compute
(Saxena's and transformers' default is 10 tokens; docs/performance.md compares lengths). With `shrink` (an
addition to the papers) a shorter match, a weaker guess, drafts fewer tokens: by default 7 after a 3-token
match, 5 after 2 and 3 after 1 (the accepted length after each match length: docs/performance.md, from
scripts/prompt_lookup_replay.py).
Left out: IAD's rule of aligning to the input's position after a mismatch (this
version looks the n-gram up again each step, which finds the same continuation when the output tracks
the input), and any learned drafting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workbench.decoding.base import Drafter, DraftTree
from workbench.decoding.ngram_index import NgramIndex
from workbench.registry import param, register


@register("decoding", "prompt_lookup", lossless=True)
@dataclass
class PromptLookup(Drafter):
    """Draft the tokens that followed the latest n-gram's earlier occurrence in prompt or output."""

    k: int = param(7, "tokens to propose after a max_ngram match (the papers use 10 whatever the match)", min=1,
                   max=64)
    max_ngram: int = param(3, "longest n-gram to match", min=1, max=16)
    min_ngram: int = param(1, "shortest n-gram to match", min=1, max=16)
    prefer: str = param("first", "which earlier occurrence to copy from when there are several",
                        choices=["first", "recent"])
    shrink: int = param(2, "tokens fewer to propose for each token the match is shorter than max_ngram (a "
                        "shorter match is a weaker guess)", min=0, max=64)
    _index: NgramIndex = field(init=False, default_factory=lambda: NgramIndex(1, 1))

    def check(self) -> None:
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must not exceed max_ngram ({self.max_ngram})")

    def begin(self, state) -> None:
        self._index = NgramIndex(self.min_ngram, self.max_ngram)

    def propose(self, state) -> DraftTree:
        tokens = state.tokens
        self._index.update(tokens)
        found = self._index.match(tokens[-self.max_ngram:], self.prefer)
        if found:
            n, start = found
            length = max(1, self.k - self.shrink * (self.max_ngram - n))
            return DraftTree.chain(tokens[start + n: start + n + length])
        return DraftTree()
