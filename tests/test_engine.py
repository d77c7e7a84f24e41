"""The engine loop on tiny random models: plain decoding, tree verification, sampling, stopping."""

import math
import random

import pytest
import torch

from workbench.decoding.base import Drafter, DraftTree
from workbench.engine import Engine
from workbench.errors import PromptError
from workbench.models.random import random_model
from workbench.spec import RunSpec

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [5, 17, 42, 99, 3, 250]


@pytest.fixture(scope="module")
def model():
    return random_model("llama", seed=1)


def reference_greedy(model, prompt, n):
    """Greedy decoding by recomputing the whole sequence each token, with no cache at all."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor(ids), torch.arange(len(ids))).logits[-1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def run(engine, prompt=PROMPT):
    events = list(engine.run(prompt))
    return [t for e in events for t in e.tokens], events


class RandomTreeDrafter(Drafter):
    """Proposes random trees that contain the true greedy continuation on some branches, so steps
    accept some nodes and reject others; nothing about it may change the output."""

    def __init__(self, truth, seed=0, max_nodes=7):
        self.truth, self.rng, self.max_nodes = truth, random.Random(seed), max_nodes

    def propose(self, state):
        done = len(state.generated)
        tokens, parents = [], []
        for _ in range(self.rng.randint(0, self.max_nodes)):
            parent = self.rng.randint(-1, len(tokens) - 1)
            depth = 1
            p = parent
            while p != -1:
                depth, p = depth + 1, parents[p]
            index = done + depth - 1
            right = index < len(self.truth) and self.rng.random() < 0.6
            tokens.append(self.truth[index] if right else self.rng.randrange(512))
            parents.append(parent)
        return DraftTree(tokens, parents)


def test_plain_greedy_matches_cacheless_reference(model):
    tokens, events = run(Engine(model, RunSpec(max_new_tokens=24)))
    assert tokens == reference_greedy(model, PROMPT, 24)
    assert len(events) == 24 and all(e.sources == ["bonus"] for e in events)
    assert events[-1].finish_reason == "length"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_verification_is_lossless_under_greedy(model, seed):
    truth = reference_greedy(model, PROMPT, 30)
    engine = Engine(model, RunSpec(max_new_tokens=30))
    engine.drafter = RandomTreeDrafter(truth, seed)
    tokens, events = run(engine)
    assert tokens == truth
    assert sum(e.n_accepted for e in events) > 0
    # each step commits its accepted drafts plus one token; only the last may lose its bonus to the budget
    assert all(len(e.tokens) == e.n_accepted + 1 for e in events[:-1])
    for e in events[1:]:  # every accepted node's parent is accepted too
        if e.tree:
            for node, ok in enumerate(e.tree.accepted):
                if ok and e.tree.parents[node] >= 0:
                    assert e.tree.accepted[e.tree.parents[node]]


def test_cache_holds_exactly_the_committed_tokens(model):
    truth = reference_greedy(model, PROMPT, 12)
    engine = Engine(model, RunSpec(max_new_tokens=12))
    engine.drafter = RandomTreeDrafter(truth, 5)
    _, events = run(engine)
    # every committed token is cached except the last (pending, as in plain decoding), whatever was drafted
    # and dropped on the way, and whether the last step ended on its bonus or inside its accepted path
    held = len(PROMPT) + 12 - 1
    assert events[-1].cache_tokens == [held] * model.config.num_layers
    per_token = model.config.num_kv_heads * (2 * model.config.head_dim * 4 + 8)  # k, v and a position per head
    assert events[-1].cache_live_bytes == held * per_token * model.config.num_layers


def test_sampling_is_seeded_and_reproducible(model):
    spec = RunSpec(max_new_tokens=20, temperature=1.0, top_k=100, seed=7)
    a, _ = run(Engine(model, spec))
    b, _ = run(Engine(model, spec))
    c, _ = run(Engine(model, RunSpec(max_new_tokens=20, temperature=1.0, top_k=100, seed=8)))
    assert a == b and a != c


def test_match_acceptor_consumes_randomness_like_plain_decoding(model):
    """Under sampling, a drafted tree verified by matching yields the very tokens plain decoding samples."""
    spec = RunSpec(max_new_tokens=25, temperature=0.7, seed=3)
    plain, _ = run(Engine(model, spec))
    engine = Engine(model, spec)
    engine.drafter = RandomTreeDrafter(plain, 11)
    tokens, events = run(engine)
    assert tokens == plain
    assert sum(e.n_accepted for e in events) > 0


def test_stops_at_eos_and_keeps_it(model):
    truth = reference_greedy(model, PROMPT, 20)
    eos = truth[7]
    tokens, events = run(Engine(model, RunSpec(max_new_tokens=20), eos_ids=[eos]))
    assert tokens == truth[: truth.index(eos) + 1]
    assert events[-1].finish_reason == "eos"


def test_stops_at_stop_string_even_inside_an_accepted_draft(model):
    truth = reference_greedy(model, PROMPT, 20)
    stop = f"<{truth[5]}><{truth[6]}>"  # the fallback detokenizer renders ids as <id>
    engine = Engine(model, RunSpec(max_new_tokens=20, stop=[stop]))
    engine.drafter = RandomTreeDrafter(truth, 2)
    tokens, events = run(engine)
    assert tokens == truth[:7]
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events).endswith(stop)


def test_max_new_tokens_cuts_a_long_accepted_path(model):
    truth = reference_greedy(model, PROMPT, 9)

    class Oracle(Drafter):
        def propose(self, state):
            return DraftTree.chain(truth[len(state.generated):] + [1, 2, 3])

    engine = Engine(model, RunSpec(max_new_tokens=9))
    engine.drafter = Oracle()
    tokens, events = run(engine)
    assert tokens == truth and len(events) == 2 and events[-1].finish_reason == "length"


def test_context_limit_ends_the_run(model):
    context = model.config.max_position_embeddings
    prompt = [7] * (context - 5)
    tokens, events = run(Engine(model, RunSpec(max_new_tokens=50)), prompt)
    assert len(tokens) == 5 and events[-1].finish_reason == "length"


@pytest.mark.parametrize("prompt, message", [([], "empty"), ([1] * 512, "context window")])
def test_bad_prompts_are_refused(model, prompt, message):
    with pytest.raises(PromptError, match=message):
        list(Engine(model, RunSpec()).run(prompt))


def test_step_events_carry_token_statistics(model):
    _, events = run(Engine(model, RunSpec(max_new_tokens=4)))
    e = events[1]
    assert e.positions == [len(PROMPT) + 1]
    assert e.logprobs[0] <= 0 and e.entropies[0] > 0
    top_ids = [t for t, _ in e.alternatives[0]]
    top_probs = [p for _, p in e.alternatives[0]]
    assert top_ids[0] == e.tokens[0]  # greedy picks the most probable token
    assert all(type(t) is int for t in top_ids) and len(set(top_ids)) == len(top_ids)
    assert top_probs == sorted(top_probs, reverse=True)
    assert math.isclose(math.exp(e.logprobs[0]), top_probs[0], rel_tol=1e-5)  # the same row, the same token
    assert e.entropies[0] <= math.log(model.config.vocab_size)
    assert e.verify_ns > 0 and e.elapsed_ns >= events[0].elapsed_ns


def test_a_sliding_window_caps_the_context():
    """The runtime has no sliding-window attention, so a Mistral window becomes the context limit."""
    model = random_model("mistral", sliding_window=16, use_sliding_window=True)
    assert model.config.context_window == 16
    with pytest.raises(PromptError, match="context window is 16"):
        list(Engine(model, RunSpec()).run(list(range(3, 20))))
    tokens, events = run(Engine(model, RunSpec(max_new_tokens=50)), list(range(3, 13)))
    assert len(tokens) == 6 and events[-1].finish_reason == "length"


def test_chain_acceptance_prediction_beside_the_measurement(model):
    from workbench.trace import Trace

    truth = reference_greedy(model, PROMPT, 40)

    class HalfRight(Drafter):
        """Chains of 3 whose tokens are right with probability about 0.6 each."""

        def __init__(self):
            self.rng = random.Random(0)

        def propose(self, state):
            done = len(state.generated)
            return DraftTree.chain([truth[done + i] if self.rng.random() < 0.6 else 0 for i in range(3)
                                    if done + i < len(truth)])

    engine = Engine(model, RunSpec(max_new_tokens=40))
    engine.drafter = HalfRight()
    trace = Trace(spec=engine.spec, prompt="", prompt_ids=PROMPT, model="tiny", dtype="float32", device="cpu")
    trace.events = list(engine.run(PROMPT))
    summary = trace.summary()
    assert 0.35 < summary["alpha"] < 0.85
    assert abs(summary["predicted_tokens_per_step"] - summary["tokens_per_step"]) < 0.5


def test_step_timings_do_not_overlap(model):
    """draft + verify + accept of a step never exceed the time between consecutive steps' ends."""
    _, events = run(Engine(model, RunSpec(max_new_tokens=6)))
    assert events[0].draft_ns + events[0].verify_ns + events[0].accept_ns <= events[0].elapsed_ns
    for before, after in zip(events, events[1:]):
        assert after.draft_ns + after.verify_ns + after.accept_ns <= after.elapsed_ns - before.elapsed_ns
