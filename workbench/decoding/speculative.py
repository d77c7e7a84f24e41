"""Lossless speculative sampling, for chains and for trees of several drafts.

Papers: Leviathan et al., "Fast Inference from Transformers via Speculative Decoding" (arXiv 2211.17192)
and Chen et al., "Accelerating LLM Decoding with Speculative Sampling" (arXiv 2302.01318) for chains;
SpecInfer (Miao et al., arXiv 2305.09781) for multi-draft trees; Recursive Speculative Decoding (Jeon et
al., arXiv 2402.14160) for drafts sampled without replacement.

At a node with target distribution p, its children are tried in drafting order. Child x, drawn from q_x,
is accepted with probability min(1, p(x) / q_x(x)); then the walk continues below it. On rejection p
becomes the residual norm(max(0, p - q_x)) and the next child is tried. If every child is rejected, the
bonus token is drawn from the last residual. With q_x the exact distribution each child was drawn from,
this keeps the target's distribution: for a chain it is the classic rule, for i.i.d. siblings it is
SpecInfer's recursive rejection sampling, and when a drafter records for each sibling the distribution
left after removing earlier siblings (sampling without replacement) it is RSD's rule. Greedy decoding
and drafts without q fall back to matching. Both distributions get the run's logits processing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.decoding.base import ROOT, Acceptance, Acceptor, DraftTree
from workbench.decoding.match import MatchAcceptor
from workbench.registry import register
from workbench.sampling import Sampler


@register("acceptance", "speculative", lossless=True)
@dataclass
class SpeculativeSampling(Acceptor):
    """Accept each draft with probability min(1, p/q), resampling from the residual (lossless)."""

    def accept(self, tree: DraftTree, logits: torch.Tensor, probs: torch.Tensor, sampler: Sampler) -> Acceptance:
        if sampler.greedy or tree.draft_probs is None or not len(tree):
            return MatchAcceptor().accept(tree, logits, probs, sampler)
        children = tree.children()
        q = tree.draft_probs.to(probs.device)
        accepted: list[int] = []
        node = ROOT
        while True:
            p = probs[node + 1]
            for child in children[node]:
                x = tree.tokens[child]
                ratio = p[x] / q[child, x]
                if torch.rand((), generator=sampler.generator, device=p.device) < ratio:
                    accepted.append(child)
                    node = child
                    break
                residual = (p - q[child]).clamp_min_(0)
                total = residual.sum()
                # total is 0 only where p <= q everywhere, i.e. p == q: rejection then had probability 0
                p = residual / total if total > 0 else p
            else:
                return Acceptance(accepted, int(sampler.draw(p)))
