"""Recursive Speculative Decoding: draft trees sampled without replacement, verified losslessly.

Paper: Jeon et al., "Recursive Speculative Decoding: Accelerating LLM Inference via Sampling Without
Replacement" (arXiv 2402.14160). The draft model grows a tree of fixed branching (RSD-C): every node at
depth d gets `branching[d]` distinct children, drawn without replacement from the draft's distribution
with the Gumbel-top-k trick (perturb log q with Gumbel noise, keep the k largest: in that order they are
a sample without replacement). Each child records the distribution it was drawn from given its earlier
siblings (q with them removed, renormalised), so the `speculative` acceptor's recursive rejection is
exactly RSD's and the output keeps the target's distribution. Under greedy decoding the children are the
draft's top-k and verification matches.

The draft model runs level by level over the whole tree built so far (a tree mask, then a rollback of
its cache), which costs more draft compute than a cache of tree nodes would, but keeps the draft cache
to committed tokens only. Left out: RSD-S (stochastic beam search under a node budget).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.decoding.base import ROOT, DraftTree
from workbench.decoding.draft_model import DraftModel
from workbench.registry import param, register


def without(q: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """q with `tokens` removed and renormalised: what the next sibling is drawn from."""
    if not tokens:
        return q
    rest = q.clone()
    rest[tokens] = 0
    total = rest.sum()
    return rest / total if total > 0 else rest


@register("decoding", "rsd", lossless=True)
@dataclass
class RecursiveSpeculative(DraftModel):
    """Draft a tree whose siblings are sampled without replacement (Gumbel-top-k); verified losslessly."""

    branching: str = param("3-2-1", "children per node at each depth, dash-separated")

    def check(self) -> None:
        try:
            widths = [int(w) for w in self.branching.split("-")]
        except ValueError:
            raise ValueError(f"branching must be dash-separated integers, got {self.branching!r}") from None
        if not widths or min(widths) < 1 or len(widths) > 8:
            raise ValueError(f"branching needs 1 to 8 depths of at least 1 child, got {self.branching!r}")

    def _children(self, q: torch.Tensor, n: int, greedy: bool) -> list[int]:
        if greedy:
            return q.topk(n).indices.tolist()
        # Gumbel-top-k: argsort of log q + Gumbel noise is a sample without replacement, in draw order
        uniform = torch.rand(q.shape, generator=self._generator, device=q.device).clamp_(1e-20, 1.0)
        keys = q.clamp_min(1e-30).log() - (-uniform.log()).log()
        keys[q <= 0] = float("-inf")
        return keys.topk(min(n, int((q > 0).sum()))).indices.tolist()

    def propose(self, state) -> DraftTree:
        sampler, tokens = state.sampler, state.tokens
        held = self._cache[0].length
        root_q = sampler.probs(self._forward(tokens[held:], held))  # catch up, ending with the pending token
        tree_tokens: list[int] = []
        parents: list[int] = []
        dists: list[torch.Tensor] = []
        frontier = [(ROOT, root_q)]  # (node, the draft distribution after it)
        widths = [int(w) for w in self.branching.split("-")]
        for depth, width in enumerate(widths):
            new_nodes = []
            for node, q in frontier:
                drawn: list[int] = []
                for token in self._children(q, width, sampler.greedy):
                    parents.append(node)
                    tree_tokens.append(token)
                    dists.append(without(q, drawn))
                    drawn.append(token)
                    new_nodes.append(len(tree_tokens) - 1)
            if depth + 1 == len(widths) or not new_nodes:
                break
            after = self._tree_forward(tree_tokens, parents, len(tokens) - 1, new_nodes, sampler)
            frontier = list(zip(new_nodes, after))
        return DraftTree(tree_tokens, parents, torch.stack(dists) if dists else None)
