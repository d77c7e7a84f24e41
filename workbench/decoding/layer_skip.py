"""Self-speculative decoding by layer skipping: the target, run with some layers skipped, drafts for itself.

Papers: SWIFT (Xia et al., "SWIFT: On-the-Fly Self-Speculative Decoding for LLM Inference Acceleration", arXiv
2410.06916) and Draft & Verify (Zhang et al., arXiv 2309.08168). Each step the target runs with a layer plan
that leaves out the skipped units, one token at a time from the pending token, and drafts up to `k` tokens as
a chain (argmax under greedy decoding, otherwise a draw from the draft's processed distribution q, recorded for
the speculative acceptor). Drafting stops after a token whose top draft probability is below `threshold`
(SWIFT's confidence-aware early stop). The draft runs on the main KV cache: its forwards append uncommitted
entries to the attention layers they run, dropped by `cache.rollback()` before the tree is returned. No
weight is copied.

The paper's form (the default, `granularity=sublayer,search=bayes`): the units skipped are attention and MLP
sublayers, chosen separately; the first and last layers always run. The set starts as `ratio` of the layers
spread over the middle ones (both sublayers each) and is optimised during the run, as in SWIFT's
optimisation phase: once `context` tokens are generated, every step scores one candidate set of the same
size by its matchness (the fraction of those tokens the skipped model predicts, in one forward over them on
a copy of the prompt's cache; `skip_search.ContextScorer`), candidates being random sets and, every
`bayes_every`-th one, the set of maximal expected improvement under a Gaussian process fitted to the scores
so far (`skip_search.BayesSearch`). A better-scoring set is adopted for drafting at once; the search stops
after `trials` candidates or at matchness 0.95 (SWIFT's early stop). The context's first set is scored
first, so a candidate must beat it (SWIFT's search starts from a score of 0).

Other forms, one parameter away: `granularity=layer` skips whole layers; `search=random` replaces the
optimisation by a measured neighbour search (one skipped unit swapped for one that runs, kept if the next
`window` verification steps produced more tokens per unit of cost, cost = 1 verification + drafted tokens x
fraction of units run; frozen after `trials` neighbours); `search=none` keeps the starting set (`skip` names
it: `4-5-6` layers, and with sublayers `5a` / `5m` a layer's attention or MLP alone).

Left out: SWIFT's top-k tree drafts built from the confidences (a chain is drafted), its choice of the skip
ratio, and its keeping of the optimiser's state across the prompts of a task (each run searches afresh); the
acquisition is maximised over a pool of random sets and the best set's one-swap neighbours instead of by
bayes_opt's continuous relaxation. The scored context is SWIFT's 32 tokens in the paper; `context` defaults
to 16 so that short outputs still reach the search.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from workbench.decoding.base import Drafter, DraftTree
from workbench.decoding.skip_search import BayesSearch, ContextScorer, layer_plan, unit_names
from workbench.errors import SpecError
from workbench.registry import param, register


def draft_chain(state, plan: list, k: int, threshold: float, generator: torch.Generator,
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


def parse_skip(text: str, sublayer: bool) -> list[int]:
    """'4-5a-6m' -> the skipped units, sorted: layer i (whole layers) or 2i / 2i + 1 (its attention / MLP; a
    bare index names both); ValueError naming the expected form otherwise."""
    units: list[int] = []
    for part in text.split("-"):
        suffix = part[-1:] if part[-1:] in ("a", "m") else ""
        if suffix and not sublayer:
            raise ValueError(f"skip={text!r}: {part!r} names a sublayer; use granularity=sublayer, or layer indices")
        try:
            layer = int(part[: len(part) - len(suffix)])
        except ValueError:
            raise ValueError(f"skip={text!r} is not a list of layer indices; expected dash-separated integers "
                             "such as 4-5-6-7 (with granularity=sublayer, 5a / 5m for layer 5's attention / MLP)"
                             ) from None
        if not sublayer:
            units.append(layer)
        else:
            units += [2 * layer] if suffix == "a" else [2 * layer + 1] if suffix == "m" else [2 * layer, 2 * layer + 1]
    if len(set(units)) != len(units):
        raise ValueError(f"skip={text!r} names a layer twice")
    return sorted(units)


@register("decoding", "layer_skip", lossless=True)
@dataclass
class LayerSkip(Drafter):
    """Draft with the target itself, skipping sublayers or layers (SWIFT's optimisation, a random search, or
    a static set)."""

    default_acceptor = "speculative"
    STOP_SCORE = 0.95  # search=bayes: matchness at which SWIFT stops optimising

    k: int = param(8, "most tokens drafted per step", min=1, max=32)
    granularity: str = param("sublayer", "what is skipped: attention and MLP sublayers separately (SWIFT), or "
                             "whole layers", choices=("sublayer", "layer"))
    search: str = param("bayes", "how the skip set is chosen during the run: bayes (SWIFT: random and "
                        "Bayesian-optimised candidates scored on the context), random (neighbour swaps kept when "
                        "tokens per cost improve), none (the starting set)", choices=("bayes", "random", "none"))
    skip: str = param("", "starting skip set, dash-separated layers (e.g. 4-5-6-7; with granularity=sublayer 5a / "
                      "5m name layer 5's attention / MLP); empty: choose it with `ratio`")
    ratio: float = param(0.5, "when `skip` is empty: fraction of all layers to skip, spread evenly over the "
                         "middle layers (the first and last always run)", min=0.0, max=0.95)
    threshold: float = param(0.6, "stop drafting after a token whose top draft probability is below this",
                             min=0.0, max=1.0)
    trials: int = param(32, "search: candidate skip sets tried before the set is frozen", min=1, max=1000)
    context: int = param(16, "search=bayes: generated tokens each candidate is scored on (SWIFT: 32)",
                         min=2, max=512)
    bayes_every: int = param(2, "search=bayes: every this-many-th candidate is Bayesian-optimised, the others "
                             "random (SWIFT: 25)", min=1, max=1000)
    window: int = param(4, "search=random: verification steps each skip set is measured over", min=1, max=256)
    skipped: list[int] = field(init=False, default_factory=list)  # the skip set in use, as units
    history: list[tuple[int, ...]] = field(init=False, default_factory=list)  # skip sets adopted, in order
    _plan: list = field(init=False, default_factory=list)
    _n_layers: int = field(init=False, default=0)
    _units: int = field(init=False, default=0)  # layers, or sublayers
    _space: list[int] = field(init=False, default_factory=list)  # units a search may skip
    _generator: torch.Generator | None = field(init=False, default=None, repr=False)
    _rng: random.Random | None = field(init=False, default=None, repr=False)
    _scorer: ContextScorer | None = field(init=False, default=None, repr=False)  # bayes, while it searches
    _bayes: BayesSearch | None = field(init=False, default=None, repr=False)
    _best: list[int] = field(init=False, default_factory=list)  # search: the incumbent skip set
    _best_score: float | None = field(init=False, default=None)  # its score
    _tokens: float = field(init=False, default=0.0)  # search=random: totals over the window being measured
    _cost: float = field(init=False, default=0.0)
    _steps: int = field(init=False, default=0)
    _tried: int = field(init=False, default=0)

    @property
    def sublayer(self) -> bool:
        return self.granularity == "sublayer"

    def check(self) -> None:
        if self.skip:
            parse_skip(self.skip, self.sublayer)

    def begin(self, state) -> None:
        n = state.model.config.num_layers
        per_layer = 2 if self.sublayer else 1
        if self.skip:
            skipped = parse_skip(self.skip, self.sublayer)
            if skipped[-1] >= per_layer * n:
                raise SpecError(f"layer_skip: skip={self.skip!r} names layers outside 0..{n - 1} (the model has "
                                f"{n} layers)")
        else:
            middle = list(range(1, n - 1))
            count = min(round(self.ratio * n), len(middle))
            layers = sorted({middle[round(i * (len(middle) - 1) / max(count - 1, 1))] for i in range(count)})
            skipped = [per_layer * i + j for i in layers for j in range(per_layer)]
        if not skipped:
            raise SpecError(f"layer_skip: skips no layer (ratio={self.ratio} of {n} layers); raise ratio or name "
                            "layers with skip=")
        if len(skipped) >= per_layer * n:
            raise SpecError(f"layer_skip: skip={self.skip!r} skips all {n} layers; at least one must run")
        self._n_layers, self._units = n, per_layer * n
        self._use(skipped)
        self.history = [tuple(skipped)]
        self._space = sorted(set(range(per_layer, per_layer * (n - 1))) | set(skipped))
        self._best, self._best_score = list(skipped), None
        self._tokens, self._cost, self._steps, self._tried = 0.0, 0.0, 0, 0
        self._generator = torch.Generator(device=state.model.device).manual_seed(state.sampler.seed + 1)
        self._rng = random.Random(state.sampler.seed + 2)
        self._scorer = self._bayes = None
        if self.search == "bayes":
            self._scorer = ContextScorer(state.cache, state.pending_position, self.context)
            self._bayes = BayesSearch(self._space, len(skipped), self.bayes_every, self._rng)

    def _use(self, skipped: list[int]) -> None:
        self.skipped = sorted(skipped)
        self._plan = layer_plan(self.skipped, self._n_layers, self.sublayer)

    def skip_names(self) -> str:
        """The skip set in use, in `skip`'s form (e.g. 4-5a-6m)."""
        return unit_names(self.skipped, self.sublayer)

    def propose(self, state) -> DraftTree:
        return draft_chain(state, self._plan, self.k, self.threshold, self._generator)[0]

    def observe(self, state, tree, acceptance, logits) -> None:
        if self.search == "bayes":
            self._optimise(state)
        elif self.search == "random":
            self._measure(tree, acceptance)

    def _optimise(self, state) -> None:
        """search=bayes: score one candidate on the context; adopt it if it beats the best so far."""
        if self._scorer is None or not self._scorer.ready(state.generated):
            return
        candidate = self.skipped if self._best_score is None else self._bayes.next()
        score = self._scorer.score(state.model, state.generated, layer_plan(candidate, self._n_layers, self.sublayer))
        self._bayes.add(candidate, score)
        self._tried += 1
        if self._best_score is None or score > self._best_score:
            if self._best_score is not None:
                self._use(candidate)
                self.history.append(tuple(self.skipped))
            self._best_score = score
        if self._tried >= self.trials or self._best_score >= self.STOP_SCORE:
            self._scorer = None  # frozen: the prompt cache's copy is freed

    def _measure(self, tree, acceptance) -> None:
        """search=random: measure the set in use over `window` steps, then try a neighbour of the best set."""
        if self._tried >= self.trials:
            return
        self._tokens += len(acceptance.accepted) + 1
        self._cost += 1 + len(tree) * (1 - len(self.skipped) / self._units)
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
        """The set with one skipped unit swapped for a searchable one that runs; None if there is none."""
        running = [u for u in self._space if u not in skipped]
        if not running:
            return None
        out = list(skipped)
        out[self._rng.randrange(len(out))] = self._rng.choice(running)
        return sorted(out)
