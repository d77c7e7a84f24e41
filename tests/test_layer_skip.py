"""layer_skip: self-speculation with skipped layers or sublayers is lossless, leaks no draft KV, and its searches
(SWIFT's Bayesian optimisation on the context, and the random neighbour search) move."""

import random

import pytest
import torch

from workbench.decoding import layer_skip  # noqa: F401  (registers layer_skip until the package imports it)
from workbench.decoding.skip_search import BayesSearch, ContextScorer, expected_improvement, layer_plan
from workbench.engine import Engine, build_cache
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
                                    {"skip": "2a-3m-5", "search": "none"},
                                    {"granularity": "layer", "search": "none"},
                                    {"context": 4, "trials": 20, "bayes_every": 1},
                                    {"context": 4, "every": 3, "keep": False},
                                    {"granularity": "layer", "search": "random", "window": 2, "trials": 6},
                                    {"search": "random", "window": 2, "trials": 6}])
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
    spec = RunSpec(max_new_tokens=8, decode=TechniqueSpec("layer_skip", {"skip": "1-4-6", "search": "none"}))
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


def test_sublayer_plan_entries_run_one_sublayer():
    """(i, "attn") then (i, "mlp") is layer i; (i, "mlp") alone writes no KV for layer i."""
    model = varied_model("llama", layers=4)
    tokens, positions = torch.tensor([4, 8, 15, 16]), torch.arange(4)
    full = model(tokens, positions, build_cache(model, [], 64)).logits
    cache = build_cache(model, [], 64)
    split = model(tokens, positions, cache, layers=[0, (1, "attn"), (1, "mlp"), 2, 3]).logits
    assert torch.allclose(split, full, atol=1e-5)
    cache = build_cache(model, [], 64)
    no_attn = model(tokens, positions, cache, layers=[0, (1, "mlp"), 2, 3]).logits
    assert cache.tokens_per_layer() == [4, 0, 4, 4]
    cache = build_cache(model, [], 64)
    no_mlp = model(tokens, positions, cache, layers=[0, (1, "attn"), 2, 3]).logits
    assert cache.tokens_per_layer() == [4, 4, 4, 4]
    assert not torch.allclose(no_attn, full, atol=1e-3) and not torch.allclose(no_mlp, full, atol=1e-3)
    assert not torch.allclose(no_attn, no_mlp, atol=1e-3)


def test_layer_plan_and_skip_names():
    assert layer_plan([2, 5, 6, 7], 4, sublayer=True) == [0, (1, "mlp"), (2, "attn")]
    assert layer_plan([1, 2], 4, sublayer=False) == [0, 3]
    drafter = layer_skip.LayerSkip(skip="1-2a-3m", search="none")
    assert layer_skip.parse_skip(drafter.skip, True) == [2, 3, 4, 7]
    drafter._n_layers, drafter.granularity = 5, "sublayer"
    drafter._use([2, 3, 4, 7])
    assert drafter.skip_names() == "1-2a-3m"


def test_the_context_score_is_one_for_the_full_model_and_lower_with_skips():
    """Matchness over the model's own greedy tokens: the full plan predicts all of them (so the scored tokens are
    aligned and see no entries of their own); skipping sublayers predicts fewer; the copy is left as it was."""
    model = varied_model("llama", layers=8)
    prompt = PROMPTS[1]
    plain, events, _ = run(model, RunSpec(max_new_tokens=20), prompt)
    cache = build_cache(model, [], 64)
    model(torch.tensor(prompt), torch.arange(len(prompt)), cache)
    cache.commit()
    scorer = ContextScorer(cache, len(prompt), context=12)
    assert scorer.ready(plain[:13]) and not scorer.ready(plain[:12])
    assert scorer.score(model, plain, list(range(8))) == 1.0
    assert scorer.score(model, plain, layer_plan(list(range(2, 14)), 8, sublayer=True)) < 1.0
    assert scorer.cache.tokens_per_layer() == [len(prompt)] * 8
    assert scorer.score(model, plain, list(range(8))) == 1.0


def test_expected_improvement_prefers_sets_like_the_good_ones():
    """Scores rise with how many of units 0..3 a set skips: EI ranks an unscored set with all four above one with
    none, and the Bayesian candidate skips more of them than the random ones do on average."""
    space, rng = list(range(12)), random.Random(0)
    search = BayesSearch(space, 4, bayes_every=1, rng=rng)
    for _ in range(12):
        units = search._random()
        search.add(units, sum(u < 4 for u in units) / 4 + 0.01 * rng.random())
    good, bad = [(0, 1, 2, 3)], [(8, 9, 10, 11)]
    x, y = search._encode(search.masks), torch.tensor(search.scores, dtype=torch.float64)
    ei = expected_improvement(x, y, search._encode(good + bad), BayesSearch.NOISE, BayesSearch.XI)
    assert ei[0] > ei[1]
    assert sum(u < 4 for u in search.next()) >= 3


def test_bayes_search_changes_the_skip_set_and_stays_lossless():
    model = varied_model("llama", layers=12)
    prompt = PROMPTS[1]
    plain = run(model, RunSpec(max_new_tokens=120), prompt)[0]
    spec = RunSpec(max_new_tokens=120, decode=TechniqueSpec("layer_skip", {"context": 8, "trials": 40, "ratio": 0.4,
                                                                           "patience": 40}))
    ours, _, drafter = run(model, spec, prompt)
    assert ours == plain
    assert len(drafter.history) > 1 and drafter.history[-1] != drafter.history[0]
    assert len(drafter.skipped) == len(drafter.history[0])  # candidates keep the number of skipped sublayers
    assert list(drafter.history[-1]) == drafter.skipped
    opt = drafter._opt
    assert len(opt.search.scores) == 40 == drafter.search_forwards and opt.done
    assert opt.best == drafter.skipped and opt.best_score == max(opt.search.scores) > opt.search.scores[0]
    assert any(u ^ 1 not in drafter.skipped for u in drafter.skipped)  # a layer with one sublayer skipped


def count_scores(monkeypatch) -> list:
    """Every ContextScorer.score call's plan, in order."""
    plans, original = [], ContextScorer.score

    def spy(self, model, generated, plan):
        plans.append(plan)
        return original(self, model, generated, plan)

    monkeypatch.setattr(ContextScorer, "score", spy)
    return plans


@pytest.mark.parametrize("params, bound", [({"trials": 5, "patience": 100}, 5), ({"trials": 100, "patience": 3}, None),
                                           ({"trials": 100, "patience": 100, "stop_score": 0.0}, 1)])
def test_the_optimisation_phase_ends_and_its_set_is_used_afterwards(monkeypatch, params, bound):
    """The phase stops after `trials` candidates, after `patience` that do not improve, or at `stop_score`;
    later steps draft with the best set, and score nothing more."""
    model = varied_model("llama", layers=12)
    plans = count_scores(monkeypatch)
    spec = RunSpec(max_new_tokens=100, decode=TechniqueSpec("layer_skip", {"context": 4, "ratio": 0.4, **params}))
    engine = Engine(model, spec)
    proposed = []
    original = engine.drafter.propose
    engine.drafter.propose = lambda state: proposed.append((len(plans), list(engine.drafter._plan))) or original(state)
    tokens = [t for e in engine.run(PROMPTS[1]) for t in e.tokens]
    drafter, opt = engine.drafter, engine.drafter._opt
    assert tokens == run(model, RunSpec(max_new_tokens=100), PROMPTS[1])[0]
    assert opt.done and len(plans) == opt.tried == drafter.search_forwards
    if bound is not None:
        assert len(plans) == bound
    else:  # ended by patience: the last 3 did not beat the best, and it took fewer than the budget
        assert opt.since_better == 3 and len(plans) < 100
    chosen = layer_plan(opt.best, 12, sublayer=True)
    after = [plan for scored, plan in proposed if scored == len(plans)]
    assert len(after) > 5 and all(plan == chosen for plan in after)
    assert drafter._scorer is None


def test_kept_optimisation_goes_on_across_runs_and_then_stops(monkeypatch):
    """keep=true (opt-in): the phase continues over the runs of a model (one memory), bounded by `trials`
    in all; a run that starts after it ended scores nothing, drafts with the best set and says it started warm.
    keep=false starts afresh every run."""
    model = varied_model("llama", layers=12)
    plans = count_scores(monkeypatch)
    params = {"context": 4, "ratio": 0.4, "trials": 30, "patience": 30, "keep": True}
    memory: dict = {}
    per_run, drafters = [], []
    for prompt in (PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1]):
        engine = Engine(model, RunSpec(max_new_tokens=24, decode=TechniqueSpec("layer_skip", params)), memory=memory)
        before = len(plans)
        ours = [t for e in engine.run(prompt) for t in e.tokens]
        assert ours == run(model, RunSpec(max_new_tokens=24), prompt)[0]
        per_run.append(len(plans) - before)
        drafters.append(engine.drafter)
    assert 0 < per_run[0] < 30 and per_run[1] > 0 and sum(per_run) == 30
    assert [d.warm_started for d in drafters] == [False] + [True] * 4
    last = drafters[-1]
    assert per_run[-1] == 0 and last._scorer is None and last.skipped == last._opt.best
    fresh = [Engine(model, RunSpec(max_new_tokens=24, decode=TechniqueSpec("layer_skip", {**params, "keep": False})),
                    memory=memory) for _ in range(2)]
    default = Engine(model, RunSpec(max_new_tokens=24, decode=TechniqueSpec("layer_skip", {"context": 4})),
                     memory=memory)
    assert default.drafter.keep is False  # a run depends on its spec, prompt and seed unless warm starts are asked for
    for engine in fresh:
        before = len(plans)
        list(engine.run(PROMPTS[1]))
        assert len(plans) - before == per_run[0] and not engine.drafter.warm_started


def test_random_search_changes_the_skip_set_and_stays_lossless():
    model = varied_model("llama", layers=12)
    prompt = PROMPTS[1]
    plain = run(model, RunSpec(max_new_tokens=120), prompt)[0]
    spec = RunSpec(max_new_tokens=120, decode=TechniqueSpec("layer_skip", {"search": "random", "window": 2,
                                                                           "granularity": "layer", "trials": 20,
                                                                           "ratio": 0.4}))
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
    ({"skip": "4a", "granularity": "layer"}, "granularity=sublayer"),
    ({"skip": "4-4m"}, "twice"),
    ({"search": "true"}, "bayes/random/none"),
])
def test_bad_parameters_say_what_is_valid(params, message):
    with pytest.raises(SpecError, match=message):
        RunSpec(decode=TechniqueSpec("layer_skip", params)).validated()


@pytest.mark.parametrize("params, message", [
    ({"skip": "2-9"}, "outside 0..7"),
    ({"skip": "0-1-2-3-4-5-6-7"}, "at least one must run"),
    ({"skip": "7m-8a"}, "outside 0..7"),
    ({"ratio": 0.0}, "skips no layer"),
])
def test_skip_sets_that_do_not_fit_the_model_are_refused(model, params, message):
    with pytest.raises(SpecError, match=message):
        run(model, RunSpec(max_new_tokens=4, decode=TechniqueSpec("layer_skip", params)), PROMPTS[0])
