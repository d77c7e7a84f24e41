"""Typical acceptance (Medusa): accept a draft token the target finds typical enough. LOSSY.

Paper: Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads"
(arXiv 2401.10774), section 2.3.1. A drafted token x under a node with target distribution p is accepted
when p(x) > min(epsilon, delta * exp(-H(p))): confident distributions demand a likely token, flat ones
accept more. Children are tried in drafting order and the walk follows the first accepted one; the bonus
token is drawn from p (argmax under greedy decoding). Under greedy decoding this can accept tokens that
are not the argmax, and under sampling it does not keep the target's distribution: outputs are
"typical" rather than exact, which is why it is marked lossy everywhere. Left out: Medusa's heads (any
drafter's tree can be verified this way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.decoding.base import ROOT, Acceptance, Acceptor, DraftTree
from workbench.registry import param, register
from workbench.sampling import Sampler


@register("acceptance", "typical", lossless=False)
@dataclass
class TypicalAcceptance(Acceptor):
    """Accept draft tokens whose target probability beats an entropy-scaled threshold (lossy)."""

    lossless = False

    epsilon: float = param(0.09, "hard threshold on the target probability", min=0.0, max=1.0)
    delta: float = param(0.3, "scale of the entropy-dependent threshold delta * exp(-H)", min=0.0, max=1.0)

    def accept(self, tree: DraftTree, logits: torch.Tensor, probs: torch.Tensor, sampler: Sampler) -> Acceptance:
        entropy = torch.special.entr(probs).sum(-1)
        threshold = torch.clamp(self.delta * torch.exp(-entropy), max=self.epsilon).tolist()
        children = tree.children()
        accepted: list[int] = []
        node = ROOT
        while True:
            row = node + 1
            typical = [c for c in children[node] if float(probs[row, tree.tokens[c]]) > threshold[row]]
            if not typical:
                bonus = int(logits[row].argmax()) if sampler.greedy else int(sampler.draw(probs[row]))
                return Acceptance(accepted, bonus)
            node = typical[0]
            accepted.append(node)
