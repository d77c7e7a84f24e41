"""Sampled output of every lossless drafter follows the target's distribution, end to end.

The harness (the tiny random model, the exact marginals, the total-variation bound, the wrong acceptor) is
`workbench/testing.py`, shared with the teaching labs. Every lossless drafter is checked with its default
acceptor; the same check must fail each one when its drafts are accepted without verification.
"""

import pytest

from workbench import registry
from workbench.decoding.base import Drafter
from workbench.testing import exact_marginals, sampled, tiny_model, tv, tv_bound

pytestmark = pytest.mark.usefixtures("one_thread")

N_POSITIONS = 4  # workbench.testing.N
TRIALS = 800  # seeds per drafter (and per wrong variant)
DRAFTERS = [t.name for t in registry.techniques("decoding")
            if t.lossless and issubclass(t.cls, Drafter) and not t.name.startswith("_") and t.name != "plain"
            and not getattr(t.cls, "needs_training", False)]  # trained drafters: test_draft_heads.py
BOUND = tv_bound(TRIALS, (len(DRAFTERS) + 1) * N_POSITIONS)  # a 1e-6 chance of a false failure, whole file

__all__ = ["exact_marginals", "tv"]  # test_lookahead imports these from here


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def exact(model):
    return exact_marginals(model)


def test_plain_sampling_follows_the_exact_marginals(model, exact):
    """The reference itself: plain decoding's samples, checked the same way."""
    ours, _ = sampled(model, "plain", TRIALS)
    assert tv(ours, exact).max() < BOUND, tv(ours, exact)


@pytest.mark.parametrize("name", DRAFTERS)
def test_sampled_output_follows_the_target_and_accepting_every_draft_fails(model, exact, name):
    ours, accepted = sampled(model, name, TRIALS)
    assert accepted > TRIALS // 10  # drafts are accepted, so acceptance is what is tested
    assert tv(ours, exact).max() < BOUND, tv(ours, exact)
    wrong, _ = sampled(model, name, TRIALS, wrong=True)
    assert tv(wrong, exact).max() > BOUND, tv(wrong, exact)
