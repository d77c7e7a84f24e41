"""Self-speculative decoding by layer skipping: the target, run with some layers skipped, drafts for itself.

Papers: SWIFT (Xia et al., "SWIFT: On-the-Fly Self-Speculative Decoding for LLM Inference Acceleration", arXiv
2410.06916) and Draft & Verify (Zhang et al., arXiv 2309.08168). Each step the target runs with a layer plan
that leaves out the skipped units, one token at a time from the pending token, and drafts up to `k` tokens as
a chain (argmax under greedy decoding, otherwise a draw from the draft's processed distribution q, recorded for
the speculative acceptor). Drafting stops after a token whose top draft probability is below `threshold`
(SWIFT's confidence-aware early stop). The draft runs on the main KV cache: its forwards append uncommitted
entries to the attention layers they run, dropped by `cache.rollback()` before the tree is returned. No
weight is copied.

SWIFT's form (`granularity=sublayer,search=bayes`, the default): the units skipped are attention and MLP
sublayers, chosen separately; the first and last layers always run. The set starts as `ratio` of the layers
spread over the middle ones (both sublayers each). An optimisation phase then looks for a better set of the
same size: once `context` tokens are generated, every `every`-th step scores one candidate by its matchness
(the fraction of those tokens the skipped model predicts, in one forward over them on a copy of the prompt's
cache; `skip_search.ContextScorer`), candidates being random sets and, every `bayes_every`-th one, the set of
maximal expected improvement under a Gaussian process fitted to the scores so far (`skip_search.BayesSearch`).
A better-scoring set is drafted with at once. The phase ends after `trials` candidates, after `patience` in a
row that do not improve (SWIFT's tolerance), or at matchness `stop_score` (SWIFT's early stop); the
acceleration phase drafts with the best set and scores nothing. By default every run searches afresh, so a run
depends only on its spec, prompt and seed. `keep=true` (opt-in, as in SWIFT, whose optimiser state lasts over a
task's prompts) carries the phase across the runs of a model, so it is paid once (at most `trials` context
forwards in all) and later runs start from the set found (their traces say `warm_start`). Measured against the
earlier default (whole layers, random search) in the same runs, SWIFT's form with `keep=true` was as fast or a
little faster with drafts accepted more, and without it slower; neither pays on a 135M model on a CPU
(docs/decoding.md, Layer skipping).

Other forms, one parameter away: `granularity=layer` skips whole layers; `search=random` replaces the
optimisation by a measured neighbour search (one skipped unit swapped for one that runs, kept if the next
`window` verification steps produced more tokens per unit of cost, cost = 1 verification + drafted tokens x
fraction of units run; frozen after `trials` neighbours, per run); `search=none` keeps the starting set
(`skip` names it: `4-5-6` layers, and with sublayers `5a` / `5m` a layer's attention or MLP alone).

Left out: SWIFT's top-k tree drafts built from the confidences (a chain is drafted) and its choice of the skip
ratio; the acquisition is maximised over a pool of random sets and the best set's one-swap neighbours instead
of by bayes_opt's continuous relaxation, with expected improvement instead of bayes_opt's UCB. SWIFT scores 32
tokens (50 in its scripts) and searches up to 1000 candidates with a tolerance of 300; `context`, `trials`
and `patience` default to 16, 32 and 8 because on a CPU a candidate's forward costs several decode steps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from workbench.decoding.base import Drafter, DraftTree
from workbench.decoding.skip_search import ContextScorer, Optimisation, layer_plan, unit_names
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
    draft_distribution = True  # every tree carries its draft distribution q

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
    trials: int = param(32, "search: candidate skip sets tried before the set is frozen (search=bayes: context "
                        "forwards, over all the runs it is kept across; SWIFT: 1000)", min=1, max=1000)
    patience: int = param(8, "search=bayes: stop after this many candidates in a row that do not beat the best "
                          "(SWIFT's tolerance: 300)", min=1, max=1000)
    stop_score: float = param(0.95, "search=bayes: stop once the best set's matchness reaches this (SWIFT: 0.93-0.95)",
                              min=0.0, max=1.0)
    every: int = param(1, "search=bayes: score a candidate every this-many steps (SWIFT's optimisation interval: 1)",
                       min=1, max=64)
    keep: bool = param(False, "search=bayes: keep the optimisation across the runs of this model (SWIFT optimises "
                       "over a task's prompts, then drafts with the set found; opt-in: a run then depends on the "
                       "runs before it, recorded as warm_start); false: every run searches afresh")
    context: int = param(16, "search=bayes: generated tokens each candidate is scored on (SWIFT: 32)",
                         min=2, max=512)
    bayes_every: int = param(2, "search=bayes: every this-many-th candidate is Bayesian-optimised, the others "
                             "random (SWIFT: 25)", min=1, max=1000)
    window: int = param(4, "search=random: verification steps each skip set is measured over", min=1, max=256)
    skipped: list[int] = field(init=False, default_factory=list)  # the skip set in use, as units
    history: list[tuple[int, ...]] = field(init=False, default_factory=list)  # skip sets adopted, in order
    search_forwards: int = field(init=False, default=0)  # search=bayes: context forwards this run
    _plan: list = field(init=False, default_factory=list)
    _n_layers: int = field(init=False, default=0)
    _units: int = field(init=False, default=0)  # layers, or sublayers
    _space: list[int] = field(init=False, default_factory=list)  # units a search may skip
    _generator: torch.Generator | None = field(init=False, default=None, repr=False)
    _rng: random.Random | None = field(init=False, default=None, repr=False)
    _scorer: ContextScorer | None = field(init=False, default=None, repr=False)  # bayes, while it optimises
    _opt: Optimisation | None = field(init=False, default=None, repr=False)  # bayes: the optimisation phase
    _best: list[int] = field(init=False, default_factory=list)  # search=random: the incumbent skip set
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
        self._scorer, self._opt, self.search_forwards = None, None, 0
        if self.search == "bayes":
            self._start_optimisation(state, skipped)

    def _start_optimisation(self, state, skipped: list[int]) -> None:
        """search=bayes: the optimisation phase, kept from earlier runs (`keep`) or new; drafts use its best set.
        The prompt's cache is copied for scoring only while the phase lasts."""
        key = (f"layer_skip:{self.granularity}:{'-'.join(map(str, skipped))}:{self.trials}:{self.patience}:"
               f"{self.stop_score}:{self.every}:{self.context}:{self.bayes_every}")
        opt = state.memory.get(key) if self.keep else None
        if opt is None:
            opt = Optimisation(skipped, self._space, self.bayes_every, self._rng, self.trials, self.patience,
                               self.stop_score)
            if self.keep:
                state.memory[key] = opt
        self.warm_started = opt.tried > 0  # drafts depend on earlier runs' search
        self._opt = opt
        if opt.best != self.skipped:
            self._use(opt.best)
            self.history = [tuple(self.skipped)]
        if not opt.done:
            self._scorer = ContextScorer(state.cache, state.pending_position, self.context)

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
        """search=bayes, during the optimisation phase: every `every` steps once the context is generated, score
        one candidate on it (one forward) and draft with it if it beats the best so far."""
        if self._scorer is None or not self._scorer.ready(state.generated):
            return
        self._steps += 1
        if (self._steps - 1) % self.every:
            return
        opt = self._opt
        candidate = opt.candidate()
        score = self._scorer.score(state.model, state.generated, layer_plan(candidate, self._n_layers, self.sublayer))
        self.search_forwards += 1
        if opt.record(candidate, score) and opt.best != self.skipped:
            self._use(opt.best)
            self.history.append(tuple(self.skipped))
        if opt.done:
            self._scorer = None  # the acceleration phase: the prompt cache's copy is freed

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
