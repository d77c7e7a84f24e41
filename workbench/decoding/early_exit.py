"""Self-speculative decoding by early exit, with the exit layer and draft length chosen from the context.

Paper: DEL (Zarch et al., "DEL: Context-Aware Dynamic Exit Layer for Efficient Self-Speculative
Decoding", arXiv 2504.05598). The draft is the target's first E layers followed by its final norm and LM
head; it drafts a chain of k tokens on the main KV cache (rolled back before verification, as in
`layer_skip`). DEL tracks, per candidate exit layer, how often that layer's prediction matches the
tokens the target verifies, and picks the E and k that maximise expected tokens per unit of cost:
(1 - a_E^(k+1)) / (1 - a_E) tokens for k * E / L + 1 target-forward equivalents.

How acceptance per layer is measured here: the engine's verification forward returns no hidden states,
and a second full forward to get them would cost as much as the verification. Instead, every
`probe_every`-th step drafts with the deepest candidate layer while keeping the residual stream; after
verification, each candidate layer's prediction (final norm + LM head on its residual, one batched call)
is compared with the verified token at every draft position whose context was fully accepted. On the
other steps the exit layer in use is measured directly by its accepted length. Estimates are discounted
counts (`decay`), starting from a prior of E / L. When no exit pays off, k = 0: the step decodes
plainly (probe steps still draft, so the estimates keep moving). Left out: DEL's shadow-token confidence thresholds for
stopping each draft (k is chosen per step, not per token), and the LayerSkip training that makes early
exits accurate: on an untrained model the early layers agree poorly with the last (docs/decoding.md
measures it on the embedded model with `scripts/early_exit_agreement.py`), so the exits that are cheap enough to
pay off rarely agree, and this drafter then chooses deep exits or k = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.decoding.base import Drafter, DraftTree
from workbench.decoding.layer_skip import draft_chain
from workbench.errors import SpecError
from workbench.registry import param, register


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per step of a chain of k drafts, each accepted with probability alpha (Leviathan et al., eq. 1)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


@register("decoding", "early_exit", lossless=True)
@dataclass
class EarlyExit(Drafter):
    """Draft with the target's first E layers; E and the draft length k follow tracked per-layer acceptance."""

    default_acceptor = "speculative"

    max_k: int = param(8, "longest draft; k is chosen in 0..max_k (0: no exit pays off, decode plainly)",
                       min=1, max=32)
    min_exit: int = param(0, "shallowest candidate exit layer; 0: a quarter of the layers", min=0, max=512)
    max_exit: int = param(0, "deepest candidate exit layer; 0: all layers but the last", min=0, max=512)
    stride: int = param(2, "spacing of the candidate exit layers", min=1, max=64)
    probe_every: int = param(4, "measure every candidate layer on every this-many-th step", min=1, max=1000)
    decay: float = param(0.9, "weight of the past in the acceptance estimates, per measured step",
                         min=0.0, max=1.0)
    exit_layer: int = field(init=False, default=0)  # E in use: the draft runs layers 0..E-1
    length: int = field(init=False, default=0)  # k in use
    candidates: list[int] = field(init=False, default_factory=list)
    acceptance: dict[int, float] = field(init=False, default_factory=dict)  # candidate -> estimated accept rate
    history: list[tuple[int, int, int]] = field(init=False, default_factory=list)  # (step, E, k) at each change
    _n_layers: int = field(init=False, default=0)
    _hits: dict[int, float] = field(init=False, default_factory=dict)
    _seen: dict[int, float] = field(init=False, default_factory=dict)
    _probing: bool = field(init=False, default=False)
    _hidden: list[torch.Tensor] = field(init=False, default_factory=list, repr=False)
    _generator: torch.Generator | None = field(init=False, default=None, repr=False)

    def check(self) -> None:
        if self.min_exit and self.max_exit and self.min_exit > self.max_exit:
            raise ValueError(f"min_exit ({self.min_exit}) must not exceed max_exit ({self.max_exit})")

    def begin(self, state) -> None:
        n = state.model.config.num_layers
        low = self.min_exit or max(1, n // 4)
        high = self.max_exit or n - 1
        if high >= n or low > high:
            raise SpecError(f"early_exit: exit layers {low}..{high} must lie in 1..{n - 1} (the model has {n} "
                            "layers; an exit at the last layer is the target itself)")
        self._n_layers = n
        self.candidates = sorted(set(range(high, low - 1, -self.stride)))
        self._hits = {c: 0.0 for c in self.candidates}
        self._seen = {c: 0.0 for c in self.candidates}
        self._estimate()
        self.exit_layer, self.length = self._choose()
        self.history = [(0, self.exit_layer, self.length)]
        self._generator = torch.Generator(device=state.model.device).manual_seed(state.sampler.seed + 1)

    def _estimate(self) -> None:
        """Acceptance per candidate: discounted hits over discounted trials, with one prior trial at E / L."""
        self.acceptance = {c: (self._hits[c] + c / self._n_layers) / (self._seen[c] + 1) for c in self.candidates}

    def _choose(self) -> tuple[int, int]:
        """The (E, k) maximising expected tokens per unit of cost, k * E / L + 1; k = 0 (plain decoding,
        1 token per unit) when no exit pays off."""
        def speed(choice: tuple[int, int]) -> float:
            exit_layer, k = choice
            return expected_tokens(self.acceptance[exit_layer], k) / (k * exit_layer / self._n_layers + 1)

        return max(((c, k) for c in self.candidates for k in range(self.max_k + 1)), key=speed)

    def propose(self, state) -> DraftTree:
        self._probing = state.step % self.probe_every == 0
        if not self._probing and self.length == 0:
            return DraftTree()
        exit_layer = self.candidates[-1] if self._probing else self.exit_layer
        tree, self._hidden = draft_chain(state, list(range(exit_layer)), max(self.length, 1), 0.0,
                                         self._generator, keep_hidden=self._probing)
        return tree

    def observe(self, state, tree, acceptance, logits) -> None:
        n_ok = len(acceptance.accepted)
        verified = [tree.tokens[i] for i in acceptance.accepted] + [acceptance.bonus]
        if self._probing:
            # Draft positions 0..n_ok had fully verified contexts; residual row c is the input to layer c.
            rows = torch.stack([h[self.candidates] for h in self._hidden[: n_ok + 1]])  # [P, C, hidden]
            predicted = state.model.logits(rows.flatten(0, 1)).argmax(-1).view(rows.shape[:2])  # [P, C]
            truth = torch.tensor(verified[: rows.shape[0]], device=predicted.device)[:, None]
            matches = (predicted == truth).sum(0).tolist()
            for c, hits in zip(self.candidates, matches):
                self._hits[c] = self.decay * self._hits[c] + hits
                self._seen[c] = self.decay * self._seen[c] + rows.shape[0]
            self._hidden = []
        elif len(tree):  # the exit in use: its drafts were accepted n_ok times, and rejected once if one was
            e = self.exit_layer
            self._hits[e] = self.decay * self._hits[e] + n_ok
            self._seen[e] = self.decay * self._seen[e] + n_ok + (1 if n_ok < len(tree) else 0)
        self._estimate()
        choice = self._choose()
        if choice != (self.exit_layer, self.length):
            self.exit_layer, self.length = choice
            self.history.append((state.step, *choice))
