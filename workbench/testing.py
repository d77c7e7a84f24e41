"""The lossless harness: does a drafter's sampled output follow the target's distribution?

Used by `tests/test_distribution.py` (every registered lossless drafter) and by the teaching labs
(`notebooks/`, lab 7 checks a drafter a student writes with it). The whole engine runs (drafter, its default
acceptor, cache commits) on a tiny random model with a vocabulary of V tokens, once per seed; the empirical
marginals of the first N generated tokens are compared with the target's exact ones (plain sampling's
distribution, computed by enumerating every continuation). The bound on total variation follows from the
sample size: for a distribution over V outcomes and n draws, P(TV >= eps) <= 2^V exp(-2 n eps^2)
(Bretagnolle-Huber-Carol), so `tv_bound` fails a correct drafter with probability below `delta`. The same
check catches a deliberately wrong variant of a drafter: its drafts accepted without verification
(`AcceptEveryDraft`).
"""

from __future__ import annotations

import itertools
import math

import torch

from workbench.decoding.base import ROOT, Acceptance, Acceptor
from workbench.engine import Engine
from workbench.models.random import random_model
from workbench.sampling import Sampler
from workbench.spec import RunSpec, TechniqueSpec

V = 8  # vocabulary of the tiny model
N = 4  # generated tokens compared; the first comes from the prefill, the others are drafted
PROMPT = [3, 4, 5, 3, 4]  # repeats, so that copying drafters find something to copy
# Parameters that make each drafter draft on a 4-layer model (defaults are sized for real ones).
PARAMS = {
    "draft_model": {"layers": 2},
    "rsd": {"layers": 2},
    "dyspec": {"layers": 2},
    "longspec": {"layers": 2, "sink": 1, "window": 2},  # a view smaller than the context
    "adaptive": {"drafter": "draft_model:layers=2"},
    "early_exit": {"probe_every": 1},
    "lookahead": {"window": 3, "ngram": 3, "candidates": 2},
    "triforce": {"budget": 2, "chunk": 1, "window": 1, "k": 2},  # a retrieval cache smaller than the prompt
}


class AcceptEveryDraft(Acceptor):
    """Wrong on purpose: commits the first child at every node down to a leaf, then samples the bonus from
    the target's distribution there. Lossless only if the drafts happened to follow the target exactly."""

    def accept(self, tree, logits, probs, sampler: Sampler) -> Acceptance:
        children, accepted, node = tree.children(), [], ROOT
        while children[node]:
            node = children[node][0]
            accepted.append(node)
        return Acceptance(accepted, int(sampler.draw(probs[node + 1])))


def tiny_model():
    """A 4-layer random Llama with V tokens, its weights scaled up so its distributions are peaked enough for
    drafts to be accepted, far from uniform."""
    model = random_model("llama", seed=3, vocab_size=V, num_hidden_layers=4)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model


def exact_marginals(model, prompt: list[int] = PROMPT, n: int = N) -> torch.Tensor:
    """[n, V] the target's exact distribution of each of the first n sampled tokens (temperature 1), by
    enumerating every continuation. All continuations of up to n - 1 tokens go through the model as one tree
    after the prompt (each token sees the prompt and its own prefix, as a verified draft tree does), so one
    forward gives every prefix's next-token distribution."""
    continuations = [seq for depth in range(1, n) for seq in itertools.product(range(V), repeat=depth)]
    row = {(): len(prompt) - 1, **{seq: len(prompt) + i for i, seq in enumerate(continuations)}}
    size = len(prompt) + len(continuations)
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[: len(prompt), : len(prompt)] = torch.ones(len(prompt), len(prompt), dtype=torch.bool).tril()
    for seq in continuations:
        mask[row[seq], : len(prompt)] = True
        mask[row[seq], [row[seq[:k]] for k in range(1, len(seq) + 1)]] = True
    tokens = torch.tensor(prompt + [seq[-1] for seq in continuations])
    positions = torch.tensor(list(range(len(prompt))) + [len(prompt) + len(seq) - 1 for seq in continuations])
    with torch.inference_mode():
        probs = Sampler(temperature=1.0).probs(model(tokens, positions, mask=mask).logits).double()
    marginals = torch.zeros(n, V, dtype=torch.float64)
    joint = {(): 1.0}  # each continuation's probability
    for seq in [(), *continuations]:
        following = joint[seq] * probs[row[seq]]
        marginals[len(seq)] += following
        if len(seq) + 1 < n:
            joint.update({seq + (t,): float(following[t]) for t in range(V)})
    return marginals


def tv_bound(n: int, tests: int, delta: float = 1e-6) -> float:
    """The total variation that n draws over V outcomes exceed with probability delta / tests."""
    return math.sqrt((V * math.log(2) + math.log(tests / delta)) / (2 * n))


def sampled(model, name: str, trials: int, wrong: bool = False, params: dict | None = None,
            prompt: list[int] = PROMPT) -> tuple[torch.Tensor, int]:
    """[N, V] empirical marginals of drafter `name` over `trials` seeded runs, and how many drafted tokens were
    accepted. `wrong` swaps in `AcceptEveryDraft`; `params` defaults to `PARAMS[name]`."""
    counts = torch.zeros(N, V, dtype=torch.float64)
    accepted = 0
    params = PARAMS.get(name, {}) if params is None else params
    for seed in range(trials):
        spec = RunSpec(max_new_tokens=N, temperature=1.0, seed=seed, decode=TechniqueSpec(name, params))
        engine = Engine(model, spec)
        if wrong:
            engine.acceptor = AcceptEveryDraft()
        tokens = []
        for event in engine.run(prompt):
            tokens += event.tokens
            accepted += event.n_accepted
        counts[torch.arange(N), torch.tensor(tokens)] += 1
    return counts / trials, accepted


def tv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Total variation per row."""
    return 0.5 * (a - b).abs().sum(-1)
