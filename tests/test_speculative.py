"""Speculative sampling keeps the target's distribution: seeded statistical tests on fixed p and q, with a
deliberately wrong acceptor that the same threshold catches; and the draft-model drafter end to end."""

import pytest
import torch

from workbench.decoding.base import Acceptance, DraftTree
from workbench.decoding.speculative import SpeculativeSampling
from workbench.engine import Engine
from workbench.models.random import random_model
from workbench.sampling import Sampler
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import varied_model

V = 8
TRIALS = 12000
THRESHOLD = 0.025  # total variation; sampling noise at 12k draws over 8 tokens is about 0.01

P0 = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.05, 0.02])  # target at the root
P1 = torch.tensor([0.05, 0.05, 0.40, 0.20, 0.10, 0.10, 0.05, 0.05])  # target after the first draft
Q = torch.tensor([0.05, 0.10, 0.10, 0.30, 0.25, 0.10, 0.05, 0.05])  # a draft unlike the target


class WrongResidual(SpeculativeSampling):
    """Accepts like speculative sampling but draws the bonus from p instead of the residual: biased."""

    def accept(self, tree, logits, probs, sampler):
        children = tree.children()[-1]
        p = probs[0]
        for child in children:
            x = tree.tokens[child]
            if torch.rand((), generator=sampler.generator) < p[x] / tree.draft_probs[child, x]:
                return Acceptance([child], 0)
        return Acceptance([], int(sampler.draw(p)))


def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


def first_tokens(acceptor, siblings: int, without_replacement: bool, seed: int = 0):
    """Draw drafts from Q as a drafter would, verify them, and count the first committed token."""
    sampler = Sampler(temperature=1.0, seed=seed)
    drafts = torch.Generator().manual_seed(seed + 100)
    probs = torch.stack([P0] + [P1] * siblings)
    counts = torch.zeros(V)
    second = torch.zeros(V)
    for _ in range(TRIALS):
        tokens, dists, q = [], [], Q.clone()
        for _ in range(siblings):
            x = int(torch.multinomial(q, 1, generator=drafts))
            tokens.append(x)
            dists.append(q)
            if without_replacement:  # RSD: the next sibling is drawn from q without the tokens drawn so far
                q = q.clone()
                q[x] = 0
                q = q / q.sum()
        tree = DraftTree(tokens, [-1] * siblings, torch.stack(dists))
        result = acceptor.accept(tree, probs.log(), probs, sampler)
        first = tree.tokens[result.accepted[0]] if result.accepted else result.bonus
        counts[first] += 1
        if result.accepted:  # the token after an accepted child comes from that child's row, P1
            second[result.bonus] += 1
    return counts, second


@pytest.mark.parametrize("siblings, without_replacement", [(1, False), (3, False), (3, True)])
def test_first_token_follows_the_target(siblings, without_replacement):
    counts, second = first_tokens(SpeculativeSampling(), siblings, without_replacement)
    assert tv(counts, P0) < THRESHOLD
    assert tv(second, P1) < 2 * THRESHOLD  # fewer samples: only the accepted trials


def test_a_wrong_acceptor_fails_the_same_test():
    counts, _ = first_tokens(WrongResidual(), 1, False)
    assert tv(counts, P0) > 2 * THRESHOLD


def test_greedy_falls_back_to_matching():
    tree = DraftTree([0, 3], [-1, 0], torch.stack([Q, Q]))
    probs = torch.stack([P0, P1, P0])
    result = SpeculativeSampling().accept(tree, probs.log(), probs, Sampler())
    assert result.accepted == [0] and result.bonus == 2  # argmax of P0 is 0, then argmax of P1 is 2


@pytest.mark.usefixtures("one_thread")
def test_draft_model_is_reproducible_and_accepts_under_sampling():
    model = random_model("llama", seed=5)
    spec = RunSpec(max_new_tokens=30, temperature=0.7, seed=3,
                   decode=TechniqueSpec("draft_model", {"layers": 3, "k": 3}))
    a = list(Engine(model, spec).run([5, 6, 7, 8]))
    b = list(Engine(model, spec).run([5, 6, 7, 8]))
    assert [e.tokens for e in a] == [e.tokens for e in b]
    assert sum(e.n_accepted for e in a) > 0
    assert all(e.tree.draft_probs[0] is not None for e in a[1:] if e.tree)


@pytest.mark.usefixtures("one_thread")
def test_rsd_trees_have_distinct_siblings_and_record_what_each_was_drawn_from():
    from workbench.decoding.rsd import RecursiveSpeculative

    model = random_model("llama", seed=5)
    engine = Engine(model, RunSpec(max_new_tokens=12, temperature=1.0, seed=4,
                                   decode=TechniqueSpec("rsd", {"layers": 2, "branching": "3-2"})))
    events = list(engine.run([5, 6, 7, 8]))
    tree = next(e.tree for e in events if e.tree)
    assert tree.parents[:3] == [-1, -1, -1] and len(tree.tokens) == 3 + 3 * 2
    assert len(set(tree.tokens[:3])) == 3  # drawn without replacement
    assert isinstance(engine.drafter, RecursiveSpeculative)
    again = list(Engine(model, engine.spec).run([5, 6, 7, 8]))
    assert [e.tokens for e in again] == [e.tokens for e in events]


def test_rsd_sibling_distributions_exclude_earlier_siblings():
    from workbench.decoding.rsd import without

    q = without(Q, [3, 4])
    assert q[3] == 0 and q[4] == 0 and torch.isclose(q.sum(), torch.tensor(1.0))
    assert torch.allclose(q[:3], Q[:3] / (1 - Q[3] - Q[4]))


@pytest.mark.usefixtures("one_thread")
def test_dyspec_grows_within_its_budget_and_deepens_where_confident():
    model = varied_model("llama", seed=5)
    spec = RunSpec(max_new_tokens=20, decode=TechniqueSpec("dyspec", {"layers": 3, "budget": 10, "per_round": 3}))
    events = list(Engine(model, spec).run([5, 6, 7, 8]))
    trees = [e.tree for e in events if e.tree]
    assert all(len(t.tokens) <= 10 for t in trees)
    assert any(max(t.depths) >= 3 for t in trees)  # not just a flat fan of the root's top tokens
