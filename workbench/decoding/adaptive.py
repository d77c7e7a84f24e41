"""Adaptive draft length for chain drafters: stop drafting when a rejection becomes likely.

Papers: SpecDec++ (Huang et al., "SpecDec++: Boosting Speculative Decoding via Adaptive Candidate
Lengths", arXiv 2405.19715) for the threshold policy; transformers' assisted generation for the
heuristic schedule it is compared with. SpecDec++ stops drafting once the estimated probability that at
least one drafted token will be rejected exceeds a threshold h: with p_j the estimated probability that
drafted token j is accepted, drafting stops once 1 - prod_j p_j > h (or at `max_k`). `head=trained` takes
p_j from the paper's acceptance head, a classifier on the draft model's last-layer state trained on the
target's own outputs (`workbench train specdec`, training/acceptance_head.py); `head=confidence`, the
default, is a stand-in that needs no training: p_j is the draft's own probability q(x_j) of the token.
The heuristic schedule (transformers'
`num_assistant_tokens_schedule="heuristic"`) drafts k tokens, adding 2 after a step that accepted all of
them and removing 1 (down to 1) otherwise. The wrapped drafter verifies as usual, so the output is
unchanged: this only changes how much is drafted. It wraps drafters that draft a chain token by token
with a draft distribution (`draft_model` and drafters built on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from workbench.decoding.base import Drafter, DraftTree
from workbench.errors import SpecError
from workbench.registry import param, register
from workbench.spec import TechniqueSpec


@register("decoding", "adaptive", lossless=True)
@dataclass
class AdaptiveLength(Drafter):
    """Wrap a chain drafter and adapt its draft length (SpecDec++ threshold, or transformers' heuristic)."""

    default_acceptor = "speculative"
    draft_distribution = True  # every tree carries its draft distribution q

    drafter: str = param("draft_model", "the chain drafter to wrap, as a technique string; inside a spec "
                         "string percent-encode its ':' ',' '=' (e.g. draft_model%3Alayers%3D6)")
    policy: str = param("specdec++", "how the length adapts", choices=["specdec++", "heuristic"])
    threshold: float = param(0.7, "specdec++: stop once P(some drafted token is rejected) exceeds this",
                             min=0.0, max=1.0)
    max_k: int = param(12, "longest draft", min=1, max=64)
    head: str = param("confidence", "specdec++: what estimates each drafted token's acceptance: 'trained' (the "
                      "paper's acceptance head, `workbench train specdec`) or 'confidence' (the draft's own "
                      "probability, a stand-in)", choices=["confidence", "trained"])
    _inner: Drafter | None = field(init=False, default=None, repr=False)

    def check(self) -> None:
        inner = TechniqueSpec.parse(self.drafter)
        try:
            built = inner.build("decoding")
        except SpecError as err:
            raise ValueError(f"drafter={self.drafter!r}: {err}") from None
        if not hasattr(built, "stop_rule") or not hasattr(built, "k"):
            raise ValueError(f"drafter={self.drafter!r} does not draft a chain token by token with a draft "
                             "distribution; wrap draft_model (or a drafter built on it)")
        if self.head == "trained" and self.policy != "specdec++":
            raise ValueError("head=trained applies to policy=specdec++ (the heuristic schedule reads no estimate)")

    def begin(self, state) -> None:
        self._inner = TechniqueSpec.parse(self.drafter).build("decoding")
        if self.policy == "specdec++":
            self._inner.k = self.max_k
            limit = 1 - self.threshold  # stop once prod q(x_j) < 1 - h
            self._inner.stop_rule = lambda confidences: math.prod(confidences) < limit
        else:
            self._inner.k = min(self._inner.k, self.max_k)
        self._inner.begin(state)
        if self.head == "trained":
            self._inner.acceptance_head = self._trained_head(state)

    def _trained_head(self, state):
        """The acceptance head trained for the wrapped draft (loaded once per model), as a callable from the
        draft's last-layer state [hidden] to the probability that the token drafted from it is accepted."""
        from workbench.decoding.draft_heads import final_norm
        from workbench.decoding.judge import JudgeHead
        from workbench.training.acceptance_head import HEAD_WIDTH, acceptance_settings
        from workbench.training.checkpoints import load_checkpoint, trained_path

        path = trained_path("specdec", state.model, acceptance_settings(self._inner))
        key = f"specdec:{path.name}"
        if key not in state.memory:
            payload = load_checkpoint(path)
            if payload is None:
                flag = "" if self.drafter == "draft_model" else f" --drafter {self.drafter}"
                raise SpecError(f"no SpecDec++ acceptance head trained for {self.drafter} on this model; train one "
                                f"with `workbench train specdec{flag} --model <the same model>` (minutes on a CPU), "
                                "or use head=confidence")
            head = JudgeHead(state.model.config.hidden_size, HEAD_WIDTH)
            head.load_state_dict(payload["state_dict"])
            state.memory[key] = head.to(state.model.device).eval()
        head, draft = state.memory[key], self._inner._model
        return lambda hidden: float(torch.sigmoid(head(final_norm(draft, hidden[None]))))

    @property
    def k(self) -> int:
        """The wrapped drafter's current (heuristic) or maximum (SpecDec++) draft length."""
        return self._inner.k

    def propose(self, state) -> DraftTree:
        return self._inner.propose(state)

    def observe(self, state, tree, acceptance, logits) -> None:
        if self.policy == "heuristic" and len(tree):
            all_accepted = len(acceptance.accepted) == len(tree)
            self._inner.k = min(self.max_k, self._inner.k + 2) if all_accepted else max(1, self._inner.k - 1)
        self._inner.observe(state, tree, acceptance, logits)
