"""layer_skip: self-speculation with skipped layers is lossless, leaks no draft KV, and its search moves."""

import pytest

from workbench.decoding import layer_skip  # noqa: F401  (registers layer_skip until the package imports it)
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import PROMPTS, varied_model

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return varied_model(request.param, layers=8)


def assert_no_leaked_entries(prompt, events, plain_events):
    """After every step, every layer holds exactly the committed tokens (all but the pending one), as in plain
    decoding. (The last step may cache accepted drafts that max_new_tokens then cuts from the output.)"""
    committed = len(prompt) - 1
    for event in events[:-1]:
        committed += len(event.tokens)
        assert event.cache_tokens == [committed] * len(event.cache_tokens)
    assert len(set(events[-1].cache_tokens)) == 1
    assert events[-1].cache_tokens[0] >= plain_events[-1].cache_tokens[0]


def run(model, spec, prompt):
    engine = Engine(model, spec)
    events = list(engine.run(prompt))
    return [t for e in events for t in e.tokens], events, engine.drafter


@pytest.mark.parametrize("params", [{}, {"skip": "2-3-5", "k": 4, "threshold": 0.0}, {"ratio": 0.25},
                                    {"search": True, "window": 2, "trials": 6}])
def test_greedy_output_and_cache_equal_plain_decoding(model, params):
    for prompt in PROMPTS:
        plain, plain_events, _ = run(model, RunSpec(max_new_tokens=40), prompt)
        ours, events, drafter = run(model, RunSpec(max_new_tokens=40, decode=TechniqueSpec("layer_skip", params)),
                                    prompt)
        assert ours == plain
        assert_no_leaked_entries(prompt, events, plain_events)
        assert any(e.n_drafted for e in events[1:])
        assert all(e.tree.draft_probs is not None for e in events[1:] if e.tree)


def test_the_draft_skips_layers_and_the_cache_is_rolled_back(model):
    """After propose, no layer holds an uncommitted entry; the plan leaves out the skip set."""
    spec = RunSpec(max_new_tokens=8, decode=TechniqueSpec("layer_skip", {"skip": "1-4-6"}))
    engine = Engine(model, spec)
    proposed = []
    original = engine.drafter.propose

    def spy(state):
        tree = original(state)
        proposed.append([(layer.length, layer.n_committed) for layer in state.cache.layers])
        return tree

    engine.drafter.propose = spy
    list(engine.run(PROMPTS[0]))
    assert engine.drafter._plan == [0, 2, 3, 5, 7]
    assert proposed and all(length == committed for step in proposed for length, committed in step)


def test_sampled_runs_are_reproducible_for_a_seed(model):
    spec = dict(max_new_tokens=30, temperature=0.9, seed=5, decode=TechniqueSpec("layer_skip", {"k": 4}))
    first = run(model, RunSpec(**spec), PROMPTS[1])[0]
    assert first == run(model, RunSpec(**spec), PROMPTS[1])[0]
    other = run(model, RunSpec(**{**spec, "seed": 6}), PROMPTS[1])[0]
    assert other != first


def test_search_changes_the_skip_set_and_stays_lossless():
    model = varied_model("llama", layers=12)
    prompt = PROMPTS[1]
    plain = run(model, RunSpec(max_new_tokens=120), prompt)[0]
    spec = RunSpec(max_new_tokens=120, decode=TechniqueSpec("layer_skip", {"search": True, "window": 2,
                                                                           "trials": 20, "ratio": 0.4}))
    ours, _, drafter = run(model, spec, prompt)
    assert ours == plain
    assert len(drafter.history) > 1 and drafter.history[-1] != drafter.history[0]
    assert len(drafter.skipped) == len(drafter.history[0])  # swaps keep the number of skipped layers
    assert list(drafter.history[-1]) == drafter.skipped


@pytest.mark.parametrize("params, message", [
    ({"skip": "4-x"}, "dash-separated"),
    ({"skip": "3-3"}, "twice"),
    ({"k": 0}, "out of range"),
    ({"threshold": 1.5}, "out of range"),
])
def test_bad_parameters_say_what_is_valid(params, message):
    with pytest.raises(SpecError, match=message):
        RunSpec(decode=TechniqueSpec("layer_skip", params)).validated()


@pytest.mark.parametrize("params, message", [
    ({"skip": "2-9"}, "outside 0..7"),
    ({"skip": "0-1-2-3-4-5-6-7"}, "at least one must run"),
    ({"ratio": 0.0}, "skips no layer"),
])
def test_skip_sets_that_do_not_fit_the_model_are_refused(model, params, message):
    with pytest.raises(SpecError, match=message):
        run(model, RunSpec(max_new_tokens=4, decode=TechniqueSpec("layer_skip", params)), PROMPTS[0])
