"""Sampled output of every lossless drafter follows the target's distribution, end to end.

The whole engine runs (drafter, its default acceptor, cache commits) on a tiny random model with a vocabulary
of V tokens, once per seed; the empirical marginals of the first N generated tokens are compared with the
target's exact ones (plain sampling's distribution, computed by enumerating every continuation). The bound
on total variation follows from the sample size: for a distribution over V outcomes and n draws,
P(TV >= eps) <= 2^V exp(-2 n eps^2) (Bretagnolle-Huber-Carol), so `tv_bound` fails a correct drafter with
probability below DELTA over all drafters and positions. The same check catches a deliberately wrong
variant of each drafter: its drafts accepted without verification (`AcceptEveryDraft`).
"""

import math

import pytest
import torch

from workbench import registry
from workbench.decoding.base import ROOT, Acceptance, Acceptor, Drafter
from workbench.engine import Engine
from workbench.models.random import random_model
from workbench.sampling import Sampler
from workbench.spec import RunSpec, TechniqueSpec

pytestmark = pytest.mark.usefixtures("one_thread")

V = 8  # vocabulary
N = 4  # generated tokens compared; the first comes from the prefill, the others are drafted
TRIALS = 800  # seeds per drafter (and per wrong variant)
DELTA = 1e-6  # chance that a correct drafter fails the test, over the whole file
PROMPT = [3, 4, 5, 3, 4]  # repeats, so that copying drafters find something to copy
DRAFTERS = [t.name for t in registry.techniques("decoding")
            if t.lossless and issubclass(t.cls, Drafter) and not t.name.startswith("_") and t.name != "plain"]
# Parameters that make each drafter draft on a 4-layer model (defaults are sized for real ones).
PARAMS = {
    "draft_model": {"layers": 2},
    "rsd": {"layers": 2},
    "dyspec": {"layers": 2},
    "adaptive": {"drafter": "draft_model:layers=2"},
    "early_exit": {"probe_every": 1},
    "lookahead": {"window": 3, "ngram": 3, "candidates": 2},
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
    model = random_model("llama", seed=3, vocab_size=V, num_hidden_layers=4)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # peaked enough that drafts get accepted, far from uniform
    return model


def exact_marginals(model, prompt: list[int] = PROMPT, n: int = N) -> torch.Tensor:
    """[n, V] the target's exact distribution of each of the first n sampled tokens (temperature 1), by
    enumerating every continuation."""
    sampler = Sampler(temperature=1.0)
    joint = {(): 1.0}
    marginals = torch.zeros(n, V, dtype=torch.float64)
    with torch.inference_mode():
        for i in range(n):
            grown = {}
            for seq, p in joint.items():
                tokens = torch.tensor(prompt + list(seq))
                probs = sampler.probs(model(tokens, torch.arange(len(tokens))).logits[-1]).double()
                for t in range(V):
                    grown[seq + (t,)] = p * float(probs[t])
                    marginals[i, t] += p * float(probs[t])
            joint = grown
    return marginals


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def exact(model) -> torch.Tensor:
    return exact_marginals(model)


def tv_bound(n: int, tests: int) -> float:
    """The total variation that n draws over V outcomes exceed with probability DELTA / tests."""
    return math.sqrt((V * math.log(2) + math.log(tests / DELTA)) / (2 * n))


BOUND = tv_bound(TRIALS, (len(DRAFTERS) + 1) * N)


def sampled(model, name: str, wrong: bool = False, trials: int = TRIALS) -> tuple[torch.Tensor, int]:
    """[N, V] empirical marginals over `trials` seeded runs, and how many drafted tokens were accepted."""
    counts = torch.zeros(N, V, dtype=torch.float64)
    accepted = 0
    for seed in range(trials):
        spec = RunSpec(max_new_tokens=N, temperature=1.0, seed=seed, decode=TechniqueSpec(name, PARAMS.get(name, {})))
        engine = Engine(model, spec)
        if wrong:
            engine.acceptor = AcceptEveryDraft()
        tokens = []
        for event in engine.run(PROMPT):
            tokens += event.tokens
            accepted += event.n_accepted
        counts[torch.arange(N), torch.tensor(tokens)] += 1
    return counts / trials, accepted


def tv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Total variation per row."""
    return 0.5 * (a - b).abs().sum(-1)


def test_plain_sampling_follows_the_exact_marginals(model, exact):
    """The reference itself: plain decoding's samples, checked the same way."""
    ours, _ = sampled(model, "plain")
    assert tv(ours, exact).max() < BOUND, tv(ours, exact)


@pytest.mark.parametrize("name", DRAFTERS)
def test_sampled_output_follows_the_target_and_accepting_every_draft_fails(model, exact, name):
    ours, accepted = sampled(model, name)
    assert accepted > TRIALS // 10  # drafts are accepted, so acceptance is what is tested
    assert tv(ours, exact).max() < BOUND, tv(ours, exact)
    wrong, _ = sampled(model, name, wrong=True)
    assert tv(wrong, exact).max() > BOUND, tv(wrong, exact)
