"""Verification by matching: accept a drafted token when it is the token the target itself chooses.

At the root the target chooses a token (argmax under greedy decoding, a sample from its processed
distribution otherwise). If a child of the root carries that token it is accepted and the walk continues
from it; otherwise the chosen token is the bonus and the step ends. Every committed token is therefore
exactly the token plain decoding would have chosen from the same distribution, so this is lossless for
any drafter, greedy or sampled; with one child per node it is the greedy rule of Leviathan et al.
[arXiv 2211.17192] and, under sampling, speculative sampling with a one-hot draft distribution. It
ignores the draft distribution q, so drafters that sample from a real q accept more with the
speculative-sampling acceptors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.decoding.base import ROOT, Acceptance, Acceptor, DraftTree
from workbench.registry import register
from workbench.sampling import Sampler, argmax_rows


@register("acceptance", "match", lossless=True)
@dataclass
class MatchAcceptor(Acceptor):
    """Accept a draft token when it equals the token the target picks there (greedy or sampled)."""

    def accept(self, tree: DraftTree, logits: torch.Tensor, probs: torch.Tensor, sampler: Sampler) -> Acceptance:
        children = tree.children()
        rescued = self.rescued(tree)
        # Greedy: every row's choice at once, one host transfer. Sampling: one draw per visited row,
        # in walk order, so the random stream is consumed exactly as plain decoding consumes it.
        choices = argmax_rows(logits) if sampler.greedy else None
        accepted: list[int] = []
        node = ROOT
        while True:
            row = node + 1
            token = choices[row] if choices is not None else int(sampler.draw(probs[row]))
            match = next((c for c in children[node] if tree.tokens[c] == token), None)
            if match is None and rescued is not None:  # a lossy subclass may accept a child anyway
                match = next((c for c in children[node] if rescued[c]), None)
            if match is None:
                return Acceptance(accepted, token)
            accepted.append(match)
            node = match

    def rescued(self, tree: DraftTree) -> list[bool] | None:
        """Per node, whether to accept it when the target chose another token there; None (matching itself,
        lossless): never. Judge Decoding overrides it."""
        return None
