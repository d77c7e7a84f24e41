"""The adaptive-length wrapper: SpecDec++'s threshold and the heuristic schedule change how much is drafted."""

import pytest

from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return varied_model()  # peaked distributions, so draft confidences vary


def drafted_lengths(model, **params):
    spec = RunSpec(max_new_tokens=40, decode=TechniqueSpec("adaptive", {"drafter": "draft_model:layers=3", **params}))
    engine = Engine(model, spec)
    events = list(engine.run([5, 6, 7, 8, 9, 10]))
    return [len(e.tree.tokens) for e in events if e.tree], engine


def test_specdec_stops_where_the_draft_gets_unsure(model):
    strict, _ = drafted_lengths(model, threshold=0.05, max_k=8)
    loose, _ = drafted_lengths(model, threshold=0.99, max_k=8)
    assert sum(strict) / len(strict) < sum(loose) / len(loose)
    assert max(loose) <= 8 and min(strict) >= 1


def test_heuristic_schedule_grows_after_full_acceptance_and_shrinks_otherwise(model):
    lengths, engine = drafted_lengths(model, policy="heuristic", max_k=10)
    assert len(set(lengths)) > 1  # it moved
    assert engine.drafter.k in range(1, 11)


def test_only_chain_drafters_with_a_distribution_can_be_wrapped():
    with pytest.raises(SpecError, match="wrap draft_model"):
        RunSpec.parse("decode=adaptive:drafter=prompt_lookup").validated()
    with pytest.raises(SpecError, match="unknown decoding technique 'nope'"):
        RunSpec.parse("decode=adaptive:drafter=nope").validated()
