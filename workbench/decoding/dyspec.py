"""DySpec: a draft tree grown greedily where the draft model is most confident, under a node budget.

Paper: Xiong et al., "DySpec: Faster Speculative Decoding with Dynamic Token Tree Structure"
(arXiv 2410.11744). The draft probability of a path is a good proxy for the chance that the target
accepts it, so the tree is grown best-first: candidates (a node's likely next tokens) wait in a heap keyed
by the draft probability of the whole path to them, and the best ones are added until the node budget is
spent. Nodes are added in rounds of `per_round`; each round costs one draft forward over the tree so far,
which yields the new nodes' own candidates. The tree is therefore deep where the draft is sure and wide
where it hesitates.

Tokens are chosen by draft probability rather than sampled, so verification matches them against the
target's own choices (lossless, greedy or sampled). Left out: the paper's sampling-based tree for
temperature > 0 with its acceptor, and its threshold-based stopping (here the budget alone bounds the tree).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workbench.decoding.base import ROOT, DraftTree
from workbench.decoding.draft_model import DraftModel
from workbench.decoding.specmemo import MemoryBudget
from workbench.registry import param, register


@register("decoding", "dyspec", lossless=True)
@dataclass
class DySpec(MemoryBudget, DraftModel):
    """Grow the draft tree best-first by draft path probability, under a node budget."""

    default_acceptor = "match"
    draft_distribution = False  # its trees are verified by matching and carry no q

    budget: int = param(12, "most nodes in a tree", min=1, max=256)
    per_round: int = param(4, "nodes added per draft forward", min=1, max=64)
    top: int = param(4, "candidates taken from each node's draft distribution", min=1, max=32)
    max_depth: int = param(8, "deepest node", min=1, max=64)

    def propose(self, state) -> DraftTree:
        sampler, tokens = state.sampler, state.tokens
        held = self._cache[0].length
        root_q = sampler.probs(self._forward(tokens[held:], held))  # catch up, ending with the pending token
        limit = self.node_limit(state.model, state.pending_position)  # SpecMemo's budget: draft no more than fits
        budget = self.budget if limit is None else min(self.budget, limit)
        return grow_tree(root_q, lambda tree, parents, wanted: self._tree_forward(tree, parents, len(tokens) - 1,
                                                                                  wanted, sampler),
                         budget, self.per_round, self.top, self.max_depth)


def grow_tree(root_q: torch.Tensor, expand: Callable[[list[int], list[int], list[int]], list[torch.Tensor]],
              budget: int, per_round: int, top: int, max_depth: int) -> DraftTree:
    """A tree grown best-first by draft path probability from the root's draft distribution root_q [vocab]:
    `expand(tokens, parents, wanted)` runs the draft over the tree so far and returns the draft distributions
    after the `wanted` nodes (one draft forward per round of `per_round` nodes)."""
    heap: list[tuple[float, int, int, int]] = []  # (-path probability, order, parent, token)
    order = 0

    def offer(parent: int, path: float, q) -> None:
        nonlocal order
        values, ids = q.topk(top)
        for value, token in zip(values.tolist(), ids.tolist()):
            heapq.heappush(heap, (-path * value, order, parent, token))
            order += 1

    offer(ROOT, 1.0, root_q)
    tree_tokens: list[int] = []
    parents: list[int] = []
    depth: list[int] = []
    path: list[float] = []
    while heap and len(tree_tokens) < budget:
        added = []
        while heap and len(added) < per_round and len(tree_tokens) < budget:
            negative, _, parent, token = heapq.heappop(heap)
            tree_tokens.append(token)
            parents.append(parent)
            depth.append(1 if parent == ROOT else depth[parent] + 1)
            path.append(-negative)
            added.append(len(tree_tokens) - 1)
        growing = [n for n in added if depth[n] < max_depth]
        if growing and len(tree_tokens) < budget:
            for node, q in zip(growing, expand(tree_tokens, parents, growing)):
                offer(node, path[node], q)
    return DraftTree(tree_tokens, parents)
