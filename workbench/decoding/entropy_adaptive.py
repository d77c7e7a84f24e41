"""Entropy Adaptive Decoding: the small model writes while it is sure, the large one takes over when it is not.
LOSSY: tokens the small model writes are kept without the target's check.

Paper: Simonds, "Entropy Adaptive Decoding: Dynamic Model Switching for Efficient Inference" (arXiv 2502.06833).
EAD generates with a small model and switches to the large one for the tokens where the small model's
rolling entropy exceeds a threshold. Here the small model is the target's first `layers` layers with its own
final norm and head (the shallow self-draft; no second weight copy). Each step the small model writes tokens
one at a time from the pending token while the entropy of its distribution (nats) stays at most `threshold`,
up to `k`; the target then runs once over them (which fills their KV cache), keeps them all (acceptor
`trust`), and writes the next token itself, the large model's token at the first uncertain position.
Where the kept tokens are not the target's argmax the engine records the departure (workbench/divergence.py).
Left out: the paper's rolling-window entropy average (the entropy of each token decides) and its separate
model pair; switching back costs nothing here because the target's cache is always complete.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.decoding.base import Acceptance, Acceptor, Drafter, DraftTree
from workbench.registry import param, register
from workbench.sampling import argmax_rows


@register("decoding", "entropy_adaptive", lossless=False)
@dataclass
class EntropyAdaptiveDrafter(Drafter):
    """The target's first layers write tokens while their entropy stays low; the target writes the rest (lossy)."""

    default_acceptor = "trust"
    draft_distribution = True  # every tree carries its draft distribution q
    layers: int = param(4, "how many of the target's first layers form the small model", min=1)
    threshold: float = param(1.0, "entropy (nats) above which the large model takes over", min=0.0)
    k: int = param(8, "most tokens the small model writes before the large model's turn", min=1, max=64)

    def propose(self, state) -> DraftTree:
        model, cache = state.model, state.cache
        plan = list(range(min(self.layers, model.config.num_layers)))
        token, position, device = state.pending, state.pending_position, model.device
        drafted, dists = [], []
        for i in range(self.k):
            out = model(torch.tensor([token], device=device), torch.tensor([position + i], device=device), cache,
                        layers=plan)
            q = torch.softmax(out.logits[0].float(), dim=-1)
            if float(torch.special.entr(q).sum()) > self.threshold:
                break  # uncertain: the large model writes this token (the bonus)
            processed = state.sampler.probs(out.logits[0])  # what the token is drawn from (softmax when greedy)
            token = int(processed.argmax()) if state.sampler.greedy else int(state.sampler.draw(processed))
            drafted.append(token)
            dists.append(processed)
        cache.rollback()
        return DraftTree.chain(drafted, torch.stack(dists) if dists else None)


@register("acceptance", "trust", lossless=False)
@dataclass
class TrustAcceptance(Acceptor):
    """Keep every drafted token of a chain unchecked; the target writes the token after it (lossy)."""

    lossless = False

    def accept(self, tree: DraftTree, logits, probs, sampler) -> Acceptance:
        if not tree.is_chain():
            raise ValueError("trust acceptance keeps a chain; this drafter proposed a tree")
        row = len(tree)
        bonus = argmax_rows(logits[row:row + 1])[0] if sampler.greedy else int(sampler.draw(probs[row]))
        return Acceptance(list(range(len(tree))), bonus)
