"""Decided acceptance: commit a chain that the drafter chose with the target itself, unchecked. LOSSY.

For drafters that decide every token by their own rule over the target's distributions (AdaDec's rerank,
A*-decoding's search), not by predicting plain decoding's choice. The verification forward then only
caches the chain: its tokens but the last are committed as accepted, the last is the step's bonus token (it
becomes the pending token, so the drafter decides the token after it too), and the forward's row after the
last token is the target's distribution at the next decision, which the drafter reads in `observe`
(`next_logits`) instead of running the target again. With an empty tree the target's own token is the
bonus (argmax, or a draw when sampling), as in plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.decoding.base import Acceptance, Acceptor, DraftTree
from workbench.errors import SpecError
from workbench.registry import register
from workbench.sampling import Sampler, argmax_rows


@register("acceptance", "decided", lossless=False)
@dataclass
class DecidedAcceptance(Acceptor):
    """Commit the drafter's chain unchecked, its last token as the bonus, for drafters that decide tokens (lossy)."""

    default_drafter = "adadec"  # the run the lossy evaluation shows this acceptor in
    lossless = False

    def accept(self, tree: DraftTree, logits: torch.Tensor, probs: torch.Tensor, sampler: Sampler) -> Acceptance:
        if not len(tree):
            bonus = argmax_rows(logits[:1])[0] if sampler.greedy else int(sampler.draw(probs[0]))
            return Acceptance([], bonus)
        if not tree.is_chain():
            raise SpecError("decided acceptance commits a chain; this drafter proposed a tree "
                            "(use it with decode=adadec or decode=astar)")
        return Acceptance(list(range(len(tree) - 1)), tree.tokens[-1])


def next_logits(tree: DraftTree, acceptance: Acceptance, logits: torch.Tensor) -> torch.Tensor | None:
    """[vocab] the target's logits after the step's last committed token, when the step committed the whole
    chain as `decided` does (its last token the bonus); None otherwise (another acceptor cut the chain)."""
    if not len(tree) or acceptance.accepted != list(range(len(tree) - 1)) or acceptance.bonus != tree.tokens[-1]:
        return None
    return logits[len(tree)]


def scratch_logits(state, tree: DraftTree) -> torch.Tensor:
    """[1 + N, vocab] the target's logits after the pending token and after each node of `tree`, from one forward
    on the cache's scratch region (rolled back: nothing is committed)."""
    model = state.model
    tree.root = state.pending
    tokens = torch.tensor(tree.forward_tokens(), device=model.device)
    positions = torch.tensor(tree.position_ids(state.pending_position), device=model.device)
    mask = tree.attention_mask(model.device) if len(tree) else None
    out = model(tokens, positions, state.cache, mask=mask)
    state.cache.rollback()
    return out.logits
