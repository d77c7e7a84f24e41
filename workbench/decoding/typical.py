"""Typical acceptance (Medusa): accept the candidate path with the longest prefix of typical tokens. LOSSY
under sampling; exact at temperature 0.

Paper: Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads"
(arXiv 2401.10774), section 2.3.1. A drafted token x under a node with target distribution p (the sampler's:
temperature and filters applied) is typical when p(x) > min(epsilon, delta * exp(-H(p))): confident
distributions demand a likely token, flat ones accept more. A path's accepted prefix ends at its first
atypical token; the step keeps the longest accepted prefix over all the tree's paths (ties: the most likely
one, by the sum of log p(x), as Medusa's code breaks them), and the bonus token is drawn from p after it.
As the temperature goes to 0, p becomes one-hot at the argmax, so only the argmax is typical: at temperature
0 this is greedy matching and the output is plain decoding's token for token (a run is then lossless:
`lossless_for`). Under sampling outputs are "typical" rather than the target's distribution, which is why it
is declared lossy.

An option that is not the paper's: `path=first` walks down from the root into the first typical child in
drafting order (the longest prefix only along that walk); `path=longest`, the default, is the paper's rule.
Left out: Medusa's heads (any drafter's tree can be verified this way), and its greedy choice of the first
token of each step (the bonus here is drawn from p, as for the other acceptors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from workbench.decoding.base import ROOT, Acceptance, Acceptor, DraftTree
from workbench.registry import param, register
from workbench.sampling import Sampler, argmax_rows

if TYPE_CHECKING:
    from workbench.spec import RunSpec


@register("acceptance", "typical", lossless=False)
@dataclass
class TypicalAcceptance(Acceptor):
    """Keep the longest draft prefix whose tokens beat an entropy-scaled probability threshold (lossy when sampling)."""

    epsilon: float = param(0.09, "hard threshold on the target probability", min=0.0, max=1.0)
    delta: float = param(0.3, "scale of the entropy-dependent threshold delta * exp(-H)", min=0.0, max=1.0)
    path: str = param("longest", "longest: the longest accepted prefix over all paths (the paper); first: follow "
                      "the first typical child from the root (not the paper's)", choices=("longest", "first"))

    def lossless_for(self, spec: RunSpec) -> bool:
        """At temperature 0 only the argmax is typical, so the run's output is plain decoding's."""
        return spec.temperature == 0

    def accept(self, tree: DraftTree, logits: torch.Tensor, probs: torch.Tensor, sampler: Sampler) -> Acceptance:
        # per node: is its token typical under its parent's distribution (row parent + 1), and how likely
        rows = [p + 1 for p in tree.parents]
        if sampler.greedy:  # the limit T -> 0: one-hot p, typical = the argmax
            choices = argmax_rows(logits)
            typical = [tree.tokens[i] == choices[row] for i, row in enumerate(rows)]
            log_p = [0.0] * len(rows)
        else:
            threshold = torch.clamp(self.delta * torch.exp(-torch.special.entr(probs).sum(-1)), max=self.epsilon)
            index = torch.tensor(rows, dtype=torch.long)
            p_x = probs[index, torch.tensor(tree.tokens, dtype=torch.long)] if rows else probs[:0, 0]
            typical = (p_x > threshold[index]).tolist()
            log_p = p_x.log().tolist()
        end = self._longest(tree, typical, log_p) if self.path == "longest" else self._first(tree, typical)
        accepted = []
        node = end
        while node != ROOT:
            accepted.append(node)
            node = tree.parents[node]
        accepted.reverse()
        row = end + 1
        bonus = choices[row] if sampler.greedy else int(sampler.draw(probs[row]))
        return Acceptance(accepted, bonus)

    @staticmethod
    def _longest(tree: DraftTree, typical: list[bool], log_p: list[float]) -> int:
        """The deepest node whose path from the root is all typical (ties: the largest sum of log p), or ROOT."""
        best, best_key = ROOT, (0, 0.0)
        score: list[tuple[int, float] | None] = []  # per node: (depth, sum of log p) if its path is accepted
        for i, parent in enumerate(tree.parents):
            above = (0, 0.0) if parent == ROOT else score[parent]
            score.append(None if above is None or not typical[i] else (above[0] + 1, above[1] + log_p[i]))
            if score[i] is not None and score[i] > best_key:
                best, best_key = i, score[i]
        return best

    @staticmethod
    def _first(tree: DraftTree, typical: list[bool]) -> int:
        """The end of the walk that enters the first typical child of each node, or ROOT."""
        children = tree.children()
        node = ROOT
        while True:
            child = next((c for c in children[node] if typical[c]), None)
            if child is None:
                return node
            node = child
