"""early_exit (DEL): drafting with the first E layers is lossless, leaks no draft KV, and E and k follow the
tracked per-layer acceptance."""

import pytest

from workbench.decoding import early_exit  # noqa: F401  (registers early_exit until the package imports it)
from workbench.decoding.early_exit import EarlyExit, expected_tokens
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import PROMPTS, varied_model

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request):
    return varied_model(request.param, layers=8)


def run(model, spec, prompt):
    engine = Engine(model, spec)
    events = list(engine.run(prompt))
    return [t for e in events for t in e.tokens], events, engine.drafter


@pytest.mark.parametrize("params", [{}, {"min_exit": 1, "max_exit": 7, "stride": 1, "probe_every": 1},
                                    {"max_k": 3, "decay": 0.5}])
def test_greedy_output_and_cache_equal_plain_decoding(model, params):
    for prompt in PROMPTS:
        plain, plain_events, _ = run(model, RunSpec(max_new_tokens=40), prompt)
        ours, events, _ = run(model, RunSpec(max_new_tokens=40, decode=TechniqueSpec("early_exit", params)), prompt)
        assert ours == plain
        committed = len(prompt) - 1  # every layer holds exactly the committed tokens after every step
        for event in events[:-1]:
            committed += len(event.tokens)
            assert event.cache_tokens == [committed] * len(event.cache_tokens)
        assert len(set(events[-1].cache_tokens)) == 1
        assert events[-1].cache_tokens[0] >= plain_events[-1].cache_tokens[0]
        assert all(e.tree.draft_probs is not None for e in events[1:] if e.tree)


def test_sampled_runs_are_reproducible_for_a_seed(model):
    spec = dict(max_new_tokens=30, temperature=0.9, seed=5, decode=TechniqueSpec("early_exit", {}))
    first = run(model, RunSpec(**spec), PROMPTS[1])[0]
    assert first == run(model, RunSpec(**spec), PROMPTS[1])[0]
    assert run(model, RunSpec(**{**spec, "seed": 6}), PROMPTS[1])[0] != first


def test_exit_layer_and_length_are_exposed_and_follow_tracked_acceptance():
    model = varied_model("llama", layers=12)
    prompt = PROMPTS[1]
    plain = run(model, RunSpec(max_new_tokens=120), prompt)[0]
    spec = RunSpec(max_new_tokens=120, decode=TechniqueSpec("early_exit", {"min_exit": 2, "stride": 1,
                                                                           "probe_every": 2}))
    ours, _, drafter = run(model, spec, prompt)
    assert ours == plain
    assert drafter.candidates == list(range(2, 12))
    assert len(drafter.history) > 1  # (step, E, k) changed as acceptance was measured
    assert drafter.history[-1][1:] == (drafter.exit_layer, drafter.length)
    assert drafter.acceptance != {c: c / 12 for c in drafter.candidates}  # moved off the prior
    assert (drafter.exit_layer, drafter.length) == drafter._choose()


def test_the_choice_maximises_expected_tokens_per_cost():
    drafter = EarlyExit(max_k=8)
    drafter._n_layers, drafter.candidates = 12, [3, 6, 9]
    drafter.acceptance = {3: 0.1, 6: 0.3, 9: 0.95}  # shallow exits disagree: go deep and long
    exit_layer, k = drafter._choose()
    assert exit_layer == 9 and k >= 2
    drafter.acceptance = {3: 0.9, 6: 0.92, 9: 0.95}  # a shallow exit agrees almost as often: it is cheaper
    assert drafter._choose()[0] == 3
    drafter.acceptance = {3: 0.01, 6: 0.02, 9: 0.05}  # nothing agrees: plain decoding is cheaper than any draft
    assert drafter._choose()[1] == 0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75) and expected_tokens(1.0, 3) == 4


@pytest.mark.parametrize("params, message", [
    ({"min_exit": 6, "max_exit": 3}, "must not exceed"),
    ({"max_k": 0}, "out of range"),
    ({"decay": 2.0}, "out of range"),
])
def test_bad_parameters_say_what_is_valid(params, message):
    with pytest.raises(SpecError, match=message):
        RunSpec(decode=TechniqueSpec("early_exit", params)).validated()


def test_exit_layers_beyond_the_model_are_refused(model):
    with pytest.raises(SpecError, match="must lie in 1..7"):
        run(model, RunSpec(max_new_tokens=4, decode=TechniqueSpec("early_exit", {"max_exit": 8})), PROMPTS[0])
