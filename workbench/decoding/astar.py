"""A*-decoding: best-first search over partial outputs under a budget, scored by the model's own
log-probability. LOSSY.

Paper: Chatziveroglou, "A*-Decoding: Token-Efficient Inference Scaling" (arXiv 2505.13672). Decoding is a
search over a state space of partial solutions: A* keeps a frontier ordered by f = g + h, expands the most
promising state (extends it by the model's candidate continuations) and stops at a complete state or when the
compute budget is spent. The paper scores states with a process reward model. No reward model is available
here, so the score is the model's own: g is the negative log-probability of the partial output under the target, and h
charges `heuristic` nats for each token still missing to the segment's length (0, the default, never
overestimates, so with budget enough the search returns the most likely segment: uniform-cost search).

In the engine loop each step searches one segment of `depth` tokens after the pending token: expanding a
partial output runs the target once over it (on the cache's scratch region) and adds its `branch` most likely
next tokens to the frontier; the first segment of full length taken off the frontier wins. When `budget`
expansions are spent first, the deepest partial output found wins (ties: the most likely). The `decided`
acceptor commits the segment; the verification forward's row after it expands the next search's root for
free. With budget 1 only the root is expanded and the segment is its most likely token: greedy decoding.

Left out: the process reward model (the model's log-probability stands in for it, which rewards likely text,
not correct text), the paper's step-level states (here a state is a token prefix) and its sampling of
candidate steps: the search is deterministic, whatever the temperature.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from workbench.decoding.base import Acceptance, Drafter, DraftTree
from workbench.decoding.decided import next_logits, scratch_logits
from workbench.registry import param, register


@register("decoding", "astar", lossless=False)
@dataclass
class AStarDrafter(Drafter):
    """Best-first search for each next segment under an expansion budget, scored by the model's own
    log-probability (no reward model here; lossy)."""

    default_acceptor = "decided"
    depth: int = param(4, "tokens per searched segment", min=1, max=32)
    branch: int = param(3, "next tokens a partial output gets when expanded (the target's most likely)", min=1,
                        max=16)
    budget: int = param(8, "most partial outputs expanded per segment, one target forward each (1: greedy)",
                        min=1, max=256)
    heuristic: float = param(0.0, "nats charged per token still missing to the segment's length (0: admissible, "
                             "uniform-cost search)", min=0.0)
    expansions: int = field(default=0, init=False)  # target forwards spent searching this run
    _next: torch.Tensor | None = field(default=None, init=False, repr=False)  # [vocab] logits after pending

    def begin(self, state) -> None:
        self.expansions, self._next = 0, None

    def propose(self, state) -> DraftTree:
        return DraftTree.chain(list(self.search(state)))

    def search(self, state) -> tuple[int, ...]:
        """The segment the search settles on (at least one token)."""
        frontier: list[tuple[float, int, tuple[int, ...], float]] = [(0.0, 0, (), 0.0)]  # (f, order, path, g)
        found: list[tuple[tuple[int, ...], float]] = []  # every partial output put on the frontier, with its g
        spent = 0
        while frontier:
            _, _, path, g = heapq.heappop(frontier)
            if len(path) == self.depth:
                return path
            if spent == self.budget:
                break
            if path or self._next is None:
                logits = scratch_logits(state, DraftTree.chain(list(path)))[-1]
                self.expansions += 1
            else:
                logits = self._next  # the root: the last verification already gave its distribution
            spent += 1
            top = torch.topk(torch.log_softmax(logits.float(), dim=-1), self.branch)
            for logp, token in zip(top.values.tolist(), top.indices.tolist()):
                child, cost = (*path, token), g - logp
                found.append((child, cost))
                f = cost + self.heuristic * (self.depth - len(child))
                heapq.heappush(frontier, (f, len(found), child, cost))
        return max(found, key=lambda item: (len(item[0]), -item[1]))[0]

    def observe(self, state, tree: DraftTree, acceptance: Acceptance, logits: torch.Tensor) -> None:
        self._next = next_logits(tree, acceptance, logits)
