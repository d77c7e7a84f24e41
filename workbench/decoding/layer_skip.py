"""Self-speculative decoding by layer skipping: the target, run with some layers skipped, drafts for itself.

Papers: Draft & Verify (Zhang et al., arXiv 2309.08168) and SWIFT (Xia et al., "SWIFT: On-the-Fly
Self-Speculative Decoding for LLM Inference Acceleration", arXiv 2410.06916). Each step the target runs
with a layer plan that leaves out the skipped layers, one token at a time from the pending token, and
drafts up to `k` tokens as a chain (argmax under greedy decoding, otherwise a draw from the draft's
processed distribution q, recorded for the speculative acceptor). Drafting stops after a token whose top
draft probability is below `threshold` (SWIFT's confidence-aware early stop). The draft runs on the main
KV cache: its forwards append uncommitted entries to the layers they run, dropped by `cache.rollback()`
before the tree is returned, so verification starts from the committed cache. No weight is copied.

The skip set is static (`skip`, or `ratio` of the layers spread evenly over the middle ones) or, with
`search=true`, optimized during decoding from the context itself, as in SWIFT: the current set is
measured over `window` verification steps, then a neighbour (one skipped layer swapped for one run layer,
so the number skipped stays fixed) is measured over the next `window` steps and kept if it produced more
tokens per unit of cost (cost = 1 verification + drafted tokens x layers run / layers). After `trials`
neighbours the set is frozen. Left out: SWIFT's Bayesian optimization (random neighbours with
keep-if-better instead), its parallel evaluation of candidates over the context in one forward (each
candidate here is measured by actually drafting with it, so a bad candidate costs a few slow steps), its
choice of the skip ratio, and its top-k tree drafts (a chain is drafted). The winning score is not
re-measured, so a lucky window can keep a set that is no better on average.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from workbench.decoding.base import Drafter, DraftTree
from workbench.errors import SpecError
from workbench.registry import param, register


def draft_chain(state, plan: list[int], k: int, threshold: float, generator: torch.Generator,
                keep_hidden: bool = False) -> tuple[DraftTree, list[torch.Tensor]]:
    """Draft up to k tokens from the pending token with the target's layers `plan`, on the main cache.

    Stops after a token whose top draft probability is below `threshold`. Every forward appends to the
    cache layers in `plan`; the cache is rolled back before returning. With `keep_hidden`, also returns
    the residual stream of each forward: one [len(plan) + 1, hidden] tensor per drafted token (the input to
    each layer run, then the last one's output), row j for the token after the pending one's j-th successor.
    """
    model, cache, sampler = state.model, state.cache, state.sampler
    device = model.device
    token, position = state.pending, state.pending_position
    drafted: list[int] = []
    dists: list[torch.Tensor] = []
    hidden: list[torch.Tensor] = []
    for i in range(k):
        out = model(torch.tensor([token], device=device), torch.tensor([position + i], device=device), cache,
                    layers=plan, hidden_states=keep_hidden)
        if keep_hidden:
            hidden.append(torch.cat(out.hidden_states))
        q = sampler.probs(out.logits[0])
        token = int(q.argmax()) if sampler.greedy else int(torch.multinomial(q, 1, generator=generator))
        drafted.append(token)
        dists.append(q)
        if float(q.max()) < threshold:
            break
    cache.rollback()  # drop the draft's entries in every layer it ran: verification sees committed tokens only
    return DraftTree.chain(drafted, torch.stack(dists)), hidden


def parse_layers(text: str) -> list[int]:
    """'4-5-6-7' -> [4, 5, 6, 7]; ValueError naming the expected form otherwise."""
    try:
        layers = [int(part) for part in text.split("-")]
    except ValueError:
        raise ValueError(f"skip={text!r} is not a list of layer indices; expected dash-separated integers "
                         "such as 4-5-6-7") from None
    if len(set(layers)) != len(layers):
        raise ValueError(f"skip={text!r} names a layer twice")
    return sorted(layers)


@register("decoding", "layer_skip", lossless=True)
@dataclass
class LayerSkip(Drafter):
    """Draft with the target itself, skipping some layers (static set or SWIFT-style online search)."""

    default_acceptor = "speculative"

    k: int = param(8, "most tokens drafted per step", min=1, max=32)
    skip: str = param("", "layers to skip, dash-separated (e.g. 4-5-6-7); empty: choose them with `ratio`")
    ratio: float = param(0.5, "when `skip` is empty: fraction of all layers to skip, spread evenly over the "
                         "middle layers (the first and last always run)", min=0.0, max=0.95)
    threshold: float = param(0.6, "stop drafting after a token whose top draft probability is below this",
                             min=0.0, max=1.0)
    search: bool = param(False, "optimize the skip set during decoding (SWIFT-style neighbour search)")
    trials: int = param(12, "search: neighbouring skip sets tried before the set is frozen", min=1, max=1000)
    window: int = param(4, "search: verification steps each skip set is measured over", min=1, max=256)
    skipped: list[int] = field(init=False, default_factory=list)  # the skip set in use
    history: list[tuple[int, ...]] = field(init=False, default_factory=list)  # skip sets adopted, in order
    _plan: list[int] = field(init=False, default_factory=list)
    _n_layers: int = field(init=False, default=0)
    _generator: torch.Generator | None = field(init=False, default=None, repr=False)
    _rng: random.Random | None = field(init=False, default=None, repr=False)
    _best: list[int] = field(init=False, default_factory=list)  # search: the incumbent skip set
    _best_score: float | None = field(init=False, default=None)  # its tokens per unit of cost
    _tokens: float = field(init=False, default=0.0)  # search: totals over the window being measured
    _cost: float = field(init=False, default=0.0)
    _steps: int = field(init=False, default=0)
    _tried: int = field(init=False, default=0)

    def check(self) -> None:
        if self.skip:
            parse_layers(self.skip)

    def begin(self, state) -> None:
        n = state.model.config.num_layers
        if self.skip:
            skipped = parse_layers(self.skip)
            if skipped[0] < 0 or skipped[-1] >= n:
                raise SpecError(f"layer_skip: skip={self.skip!r} names layers outside 0..{n - 1} (the model has "
                                f"{n} layers)")
        else:
            middle = list(range(1, n - 1))
            count = min(round(self.ratio * n), len(middle))
            skipped = sorted({middle[round(i * (len(middle) - 1) / max(count - 1, 1))] for i in range(count)})
        if not skipped:
            raise SpecError(f"layer_skip: skips no layer (ratio={self.ratio} of {n} layers); raise ratio or name "
                            "layers with skip=")
        if len(skipped) >= n:
            raise SpecError(f"layer_skip: skip={self.skip!r} skips all {n} layers; at least one must run")
        self._n_layers = n
        self._use(skipped)
        self.history = [tuple(skipped)]
        self._best, self._best_score = list(skipped), None
        self._tokens, self._cost, self._steps, self._tried = 0.0, 0.0, 0, 0
        self._generator = torch.Generator(device=state.model.device).manual_seed(state.sampler.seed + 1)
        self._rng = random.Random(state.sampler.seed + 2)

    def _use(self, skipped: list[int]) -> None:
        self.skipped = sorted(skipped)
        self._plan = [i for i in range(self._n_layers) if i not in set(self.skipped)]

    def propose(self, state) -> DraftTree:
        return draft_chain(state, self._plan, self.k, self.threshold, self._generator)[0]

    def observe(self, state, tree, acceptance, logits) -> None:
        if not self.search or self._tried >= self.trials:
            return
        self._tokens += len(acceptance.accepted) + 1
        self._cost += 1 + len(tree) * len(self._plan) / self._n_layers
        self._steps += 1
        if self._steps < self.window:
            return
        score = self._tokens / self._cost
        self._tokens, self._cost, self._steps = 0.0, 0.0, 0
        if self._best_score is None:  # the starting set has been measured
            self._best_score = score
        else:  # a neighbour has been measured
            self._tried += 1
            if score > self._best_score:
                self._best, self._best_score = list(self.skipped), score
                self.history.append(tuple(self.skipped))
        neighbour = self._neighbour(self._best)
        self._use(neighbour if neighbour is not None and self._tried < self.trials else self._best)

    def _neighbour(self, skipped: list[int]) -> list[int] | None:
        """The set with one skipped layer swapped for one middle layer that runs; None if there is none."""
        running = [i for i in range(1, self._n_layers - 1) if i not in skipped]
        if not running:
            return None
        out = list(skipped)
        out[self._rng.randrange(len(out))] = self._rng.choice(running)
        return sorted(out)
