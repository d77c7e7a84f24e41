"""Entropy Adaptive Decoding: lossy, labelled so, and it switches by the small model's entropy."""

from workbench.decoding.entropy_adaptive import EntropyAdaptiveDrafter
from workbench.divergence import divergence
from workbench.engine import Engine
from workbench.registry import get
from workbench.spec import RunSpec

from .helpers import varied_model


def _run(spec: str):
    model = varied_model()
    return list(Engine(model, RunSpec.parse(spec)).run([1, 2, 3, 4]))


def test_it_is_labelled_lossy():
    assert not get("decoding", "entropy_adaptive").lossless and not get("acceptance", "trust").lossless
    assert not RunSpec.parse("decode=entropy_adaptive").lossless


def test_a_zero_threshold_hands_every_token_to_the_target_and_matches_plain():
    plain = [t for e in _run("max_new_tokens=10") for t in e.tokens]
    events = _run("max_new_tokens=10;decode=entropy_adaptive:threshold=0")
    assert [t for e in events for t in e.tokens] == plain
    assert all(e.n_drafted == 0 for e in events)


def test_a_high_threshold_keeps_the_small_models_tokens_unchecked():
    events = _run("max_new_tokens=12;decode=entropy_adaptive:threshold=100,k=4,layers=1")
    middle = events[1:-1]  # the last step's tokens may be cut by the budget
    assert all(e.n_accepted == e.n_drafted for e in middle) and sum(e.n_drafted for e in middle) > 0
    assert divergence(type("T", (), {"events": events})())["departures"] is not None
    assert EntropyAdaptiveDrafter().default_acceptor == "trust"
