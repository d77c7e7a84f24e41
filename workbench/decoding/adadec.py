"""AdaDec: uncertainty-guided adaptive decoding for code, pause and rerank where the target is unsure. LOSSY.

Paper: He et al., "Towards Better Code Generation: Adaptive Decoding with Uncertainty Guidance" (AdaDec,
arXiv 2506.08980). Most code-generation errors of greedy decoding sit at high-entropy steps where the right
token is among the top candidates but not first. AdaDec decodes greedily while the Shannon entropy of the
target's next-token distribution stays at most a threshold; above it, it pauses, gives each of the top
`candidates` tokens a greedy lookahead of `lookahead` tokens, and keeps the candidate whose lookahead
scores best: here the sum of the target's log-probabilities of the candidate and its continuation (all
continuations have the same length, so this ranks as their mean). The continuation is discarded; the next
position is decided the same way.

In the engine loop the drafter decides one token per step and the `decided` acceptor commits it as the bonus:
the verification forward runs over [pending, token], caches the pending token and gives the target's
distribution after the new token, which is the next step's decision (no second forward). The lookahead of all
candidates runs as one tree, depth by depth, on the cache's scratch region (`lookahead` forwards per pause).
Under sampling the confident steps draw from the target's (processed) distribution; reranking stays greedy.

Left out: the paper learns the threshold per model (a logistic regression on entropies of right and wrong
tokens); here it is the parameter `threshold`, in nats, 1.5 by default (so that on code a minority of
positions pause). The first token after the prompt is the target's own choice (it is chosen from the
prefill, before any drafter runs), and a lookahead does not stop at end-of-sequence tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.decoding.base import ROOT, Acceptance, Drafter, DraftTree
from workbench.decoding.decided import next_logits, scratch_logits
from workbench.registry import param, register


@register("decoding", "adadec", lossless=False)
@dataclass
class AdaDecDrafter(Drafter):
    """Greedy while the target is sure; where its entropy passes a threshold, rerank its top tokens by a short
    lookahead (lossy)."""

    default_acceptor = "decided"
    threshold: float = param(1.5, "entropy (nats) of the target's next-token distribution above which decoding "
                             "pauses to rerank (inf: never, plain greedy decoding)", min=0.0)
    candidates: int = param(3, "top tokens reranked at a pause", min=2, max=16)
    lookahead: int = param(4, "greedy tokens generated after each candidate to score it", min=1, max=16)
    pauses: int = field(default=0, init=False)  # reranked positions this run
    _next: torch.Tensor | None = field(default=None, init=False, repr=False)  # [vocab] logits after pending

    def begin(self, state) -> None:
        self.pauses, self._next = 0, None

    def propose(self, state) -> DraftTree:
        logits = self._next if self._next is not None else scratch_logits(state, DraftTree())[0]
        probs = torch.softmax(logits.float(), dim=-1)
        if float(torch.special.entr(probs).sum()) <= self.threshold:
            if state.sampler.greedy:
                token = int(logits.argmax())
            else:
                token = int(state.sampler.draw(state.sampler.probs(logits)))
        else:
            self.pauses += 1
            token = self.rerank(state, probs)
        return DraftTree.chain([token])

    def rerank(self, state, probs: torch.Tensor) -> int:
        """The top candidate token after the pending one whose greedy lookahead the target scores highest."""
        top = torch.topk(probs, min(self.candidates, probs.shape[-1]))
        score = top.values.log().tolist()
        tokens, parents = top.indices.tolist(), [ROOT] * len(score)
        leaves = list(range(len(score)))  # the node each candidate's continuation ends in
        for _ in range(self.lookahead):
            logp = torch.log_softmax(scratch_logits(state, DraftTree(tokens, parents))[[n + 1 for n in leaves]], -1)
            best = logp.max(dim=-1)
            for i, (value, token) in enumerate(zip(best.values.tolist(), best.indices.tolist())):
                score[i] += value
                tokens.append(token)
                parents.append(leaves[i])
                leaves[i] = len(tokens) - 1
        return tokens[max(range(len(score)), key=score.__getitem__)]

    def observe(self, state, tree: DraftTree, acceptance: Acceptance, logits: torch.Tensor) -> None:
        self._next = next_logits(tree, acceptance, logits)
