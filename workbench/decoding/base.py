"""Draft trees and the Drafter / Acceptor interfaces every decoding technique plugs into.

Each step the engine runs the target once over `[pending] + tree.tokens`: the pending token is the last
committed token (its KV not yet cached) and is the tree's root. Row 0 of the logits is the target's
distribution after the root, row i + 1 the distribution after node i. A chain is a tree whose nodes each
have one child; plain decoding proposes an empty tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from workbench.sampling import Sampler

if TYPE_CHECKING:
    from workbench.engine import DecodeState

ROOT = -1  # parent index of a node drafted directly after the pending token


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)  # [N] drafted token ids
    parents: list[int] = field(default_factory=list)  # [N] parent node index, ROOT for the root's children
    # q: [N, vocab] the (processed) draft distribution each node's token was drawn from; None for drafters
    # that propose deterministically (n-gram lookup, recycling), whose drafts are verified by matching.
    draft_probs: torch.Tensor | None = None
    root: int | None = None  # the pending token the tree hangs from; the engine sets it

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("a draft tree needs one parent per token")
        for i, p in enumerate(self.parents):
            if not ROOT <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must come before their children")

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: list[int], draft_probs: torch.Tensor | None = None) -> DraftTree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), draft_probs)

    def depths(self) -> list[int]:
        """Depth of each node; the root's children have depth 1."""
        depth: list[int] = []
        for p in self.parents:
            depth.append(1 if p == ROOT else depth[p] + 1)
        return depth

    def children(self) -> dict[int, list[int]]:
        """Node index (ROOT included) -> its children, in drafting order."""
        out: dict[int, list[int]] = {ROOT: []}
        for i, p in enumerate(self.parents):
            out.setdefault(p, []).append(i)
            out.setdefault(i, [])
        return out

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def attention_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[N + 1, N + 1] bool over root + nodes: each sees itself and its ancestors (tree attention,
        SpecInfer [arXiv 2305.09781, sec. 4.2])."""
        n = len(self.tokens) + 1
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            row = i + 1
            mask[row, row] = True
            mask[row] |= mask[p + 1]
        return mask.to(device)

    def positions(self, root_position: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[N + 1] logical positions of root + nodes: the root's, plus each node's depth."""
        return torch.tensor([root_position] + [root_position + d for d in self.depths()], device=device)


@dataclass
class Acceptance:
    """What an acceptor decided about one verified tree."""

    accepted: list[int]  # node indices on the accepted path, root to leaf
    bonus: int  # the token the target chose after the accepted path


class Drafter:
    """Proposes a draft tree each step. Subclasses are registered dataclasses under `decoding`.

    `begin` is called once per run after prefill, `propose` before each verification, `observe` after it
    (adaptive drafters learn there). A fresh instance is built for every run, so state never leaks.
    """

    default_acceptor = "match"

    def begin(self, state: DecodeState) -> None:
        """Set up per-run state (the prompt and the target model are on `state`)."""

    def propose(self, state: DecodeState) -> DraftTree:
        raise NotImplementedError

    def observe(self, state: DecodeState, tree: DraftTree, acceptance: Acceptance, logits: torch.Tensor) -> None:
        """Called after verification, once the step's tokens are committed to `state`, with the target's
        logits [N + 1, vocab] over the root and the nodes."""


class Acceptor:
    """Decides which drafted nodes the target accepts, and the bonus token. Registered under `acceptance`."""

    lossless = True

    def accept(self, tree: DraftTree, logits: torch.Tensor, probs: torch.Tensor, sampler: Sampler) -> Acceptance:
        """logits, probs: [N + 1, vocab], the target's raw logits and `sampler.probs(logits)`."""
        raise NotImplementedError
