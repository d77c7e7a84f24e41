"""SWIFT's layer-set optimisation for `layer_skip`: scoring a skip set on the context, the search over sets, and
the optimisation phase that ends.

A skip set is a set of *units*: whole layers (granularity `layer`, unit i = layer i) or sublayers (granularity
`sublayer`, unit 2i = layer i's attention, 2i + 1 = its MLP). `layer_plan` turns a set into the model's
layer plan. SWIFT (Xia et al., arXiv 2410.06916, sec. 4) scores a candidate set by how many of the target's
own recent tokens the skipped model predicts in one forward over them (`ContextScorer`), picks candidates
by random search interleaved with Bayesian optimisation (`BayesSearch`: a Gaussian-process surrogate over
skip masks with expected improvement), and stops optimising after a budget, a run of candidates that do not
improve, or a good enough score (`Optimisation`); the acceleration phase then drafts with the best set.
"""

from __future__ import annotations

import math
import random

import torch

from workbench.cache.base import KVCache
from workbench.cache.dense import DenseLayerCache

PARTS = ("attn", "mlp")


def layer_plan(skipped: list[int], n_layers: int, sublayer: bool) -> list[int | tuple[int, str]]:
    """The layers to run in order: i runs layer i whole, (i, "attn") / (i, "mlp") that sublayer alone."""
    if not sublayer:
        gone = set(skipped)
        return [i for i in range(n_layers) if i not in gone]
    gone = set(skipped)
    plan: list[int | tuple[int, str]] = []
    for i in range(n_layers):
        runs = [part for j, part in enumerate(PARTS) if 2 * i + j not in gone]
        if len(runs) == 2:
            plan.append(i)
        elif runs:
            plan.append((i, runs[0]))
    return plan


def unit_names(skipped: list[int], sublayer: bool) -> str:
    """'4-5a-6m' form of a skip set (a: attention, m: MLP; a bare layer index: both, or the whole layer)."""
    if not sublayer:
        return "-".join(map(str, skipped))
    gone, names = set(skipped), []
    for i in sorted({u // 2 for u in skipped}):
        both = {2 * i, 2 * i + 1} <= gone
        names.append(str(i) if both else f"{i}a" if 2 * i in gone else f"{i}m")
    return "-".join(names)


class ContextScorer:
    """SWIFT's matchness: the fraction of the first `context` generated tokens that the skipped model predicts
    (argmax) from the ones before them, in one forward over them on a copy of the prompt's cache.

    The copy (dense, in the form the cache's `view()` gives) is taken when the scorer is built, before any
    token is generated, so the scored tokens never see their own committed entries."""

    def __init__(self, cache: KVCache, start_position: int, context: int):
        self.cache = KVCache([self._copy(layer, context + 1) for layer in cache.layers])
        self.start, self.context = start_position, context

    @staticmethod
    def _copy(layer, spare: int) -> DenseLayerCache:
        k, v = layer.view()  # [kv_heads, length, head_dim]
        out = DenseLayerCache(k.shape[0], k.shape[2], k.dtype, k.device, k.shape[1] + spare)
        out.append(k, v, layer.positions[0] if layer.length else torch.zeros(0, dtype=torch.long))
        out.n_committed = out.length
        return out

    def ready(self, generated: list[int]) -> bool:
        return len(generated) > self.context

    def score(self, model, generated: list[int], plan: list) -> float:
        """Matchness of `plan` on generated[: context + 1] (needs `ready`)."""
        tokens = torch.tensor(generated[: self.context + 1], device=model.device)
        positions = torch.arange(self.start, self.start + len(tokens), device=model.device)
        logits = model(tokens, positions, self.cache, layers=plan).logits  # [context + 1, vocab]
        self.cache.rollback()
        return float((logits[:-1].argmax(-1) == tokens[1:]).float().mean())


class BayesSearch:
    """Candidate skip sets of a fixed size over the searchable units, SWIFT-style: uniformly random sets,
    and every `bayes_every`-th candidate the set that maximises expected improvement under a Gaussian process
    fitted to every set scored so far (inputs: 0/1 masks over the units; RBF kernel, its length scale chosen
    by marginal likelihood from a small grid; targets standardised; noise 1e-2 as in SWIFT's GP). The
    acquisition is maximised over random sets and every one-swap neighbour of the best set, not yet scored."""

    NOISE = 1e-2
    POOL = 256  # random sets in the acquisition's candidate pool
    XI = 0.01  # EI's exploration margin, in standardised units

    def __init__(self, space: list[int], size: int, bayes_every: int, rng: random.Random):
        self.space, self.size, self.bayes_every, self.rng = list(space), size, bayes_every, rng
        self.masks: list[tuple[int, ...]] = []  # scored sets, as sorted unit tuples
        self.scores: list[float] = []

    def add(self, skipped: list[int], score: float) -> None:
        self.masks.append(tuple(sorted(skipped)))
        self.scores.append(score)

    def next(self) -> list[int]:
        """The next candidate to score."""
        if len(self.masks) >= 2 and len(self.masks) % self.bayes_every == 0:
            return self.suggest()
        return self._random()

    def _random(self) -> list[int]:
        return sorted(self.rng.sample(self.space, self.size))

    def _encode(self, sets) -> torch.Tensor:
        index = {u: j for j, u in enumerate(self.space)}
        x = torch.zeros(len(sets), len(self.space), dtype=torch.float64)
        for row, units in enumerate(sets):
            x[row, [index[u] for u in units]] = 1.0
        return x

    def suggest(self) -> list[int]:
        """The unscored set of maximal expected improvement (a random one when every candidate is scored)."""
        best = self.masks[max(range(len(self.scores)), key=self.scores.__getitem__)]
        pool = {tuple(self._random()) for _ in range(self.POOL)}
        outside = [u for u in self.space if u not in best]
        pool |= {tuple(sorted([*best[:i], *best[i + 1:], u])) for i in range(len(best)) for u in outside}
        pool -= set(self.masks)
        if not pool:
            return self._random()
        pool = sorted(pool)
        ei = expected_improvement(self._encode(self.masks), torch.tensor(self.scores, dtype=torch.float64),
                                  self._encode(pool), self.NOISE, self.XI)
        return list(pool[int(ei.argmax())])


def expected_improvement(x: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor, noise: float,
                         xi: float) -> torch.Tensor:
    """EI [Jones et al. 1998] of `candidates` [C, D] under a GP fitted to x [N, D], y [N] (float64)."""
    std = y.std() if len(y) > 1 and float(y.std()) > 1e-9 else torch.tensor(1.0, dtype=y.dtype)
    target = (y - y.mean()) / std
    dist = torch.cdist(x, x) ** 2  # [N, N] squared distances (Hamming distances of 0/1 masks)
    cross = torch.cdist(candidates, x) ** 2  # [C, N]
    eye = torch.eye(len(y), dtype=y.dtype)
    best_fit = None
    for length2 in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0):  # squared length scales; keep the most likely
        chol = torch.linalg.cholesky(torch.exp(-dist / (2 * length2)) + noise * eye)
        alpha = torch.cholesky_solve(target[:, None], chol)  # [N, 1]
        log_likelihood = float(-0.5 * target @ alpha[:, 0] - chol.diagonal().log().sum())
        if best_fit is None or log_likelihood > best_fit[0]:
            best_fit = (log_likelihood, length2, chol, alpha)
    _, length2, chol, alpha = best_fit
    k_cross = torch.exp(-cross / (2 * length2))  # [C, N]
    mean = (k_cross @ alpha)[:, 0]
    solved = torch.cholesky_solve(k_cross.T, chol)  # [N, C]
    sigma = (1.0 - (k_cross * solved.T).sum(-1)).clamp_min(1e-12).sqrt()
    z = (mean - target.max() - xi) / sigma
    density = torch.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
    return (mean - target.max() - xi) * torch.special.ndtr(z) + sigma * density


class Optimisation:
    """SWIFT's optimisation phase over skip sets of one size. `candidate()` gives the set to score next (the
    starting set first, so a candidate must beat it), `record()` takes its score; the best set so far is the
    one to draft with. The phase ends (`done`) after `trials` scored sets, after `patience` in a row that did
    not beat the best (SWIFT's tolerance), or once the best scores `stop_score` (SWIFT's early stop). The
    object holds the whole state, so a drafter can keep it across runs (SWIFT keeps it over a task's prompts)."""

    def __init__(self, start: list[int], space: list[int], bayes_every: int, rng: random.Random, trials: int,
                 patience: int, stop_score: float):
        self.search = BayesSearch(space, len(start), bayes_every, rng)
        self.best, self.best_score = sorted(start), None
        self.trials, self.patience, self.stop_score = trials, patience, stop_score
        self.tried = 0  # sets scored: one context forward each
        self.since_better = 0
        self.done = False

    def candidate(self) -> list[int]:
        return list(self.best) if self.best_score is None else self.search.next()

    def record(self, candidate: list[int], score: float) -> bool:
        """Take a candidate's score; True when it is the new best."""
        self.search.add(candidate, score)
        self.tried += 1
        better = self.best_score is None or score > self.best_score
        if better:
            self.best, self.best_score, self.since_better = sorted(candidate), score, 0
        else:
            self.since_better += 1
        self.done = (self.tried >= self.trials or self.since_better >= self.patience
                     or self.best_score >= self.stop_score)
        return better
