"""Lookahead decoding: the window's mask and positions, aux tokens never committed nor recorded, greedy
equality in another configuration, seeded determinism, and sampled output that follows the target's
distribution (exact marginals on a tiny vocabulary, with a deliberately biased variant the test catches)."""

from dataclasses import dataclass

import pytest
import torch

from workbench.decoding.lookahead import Lookahead
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.models.random import random_model
from workbench.registry import register
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import PROMPTS, varied_model
from .test_distribution import exact_marginals, tv

pytestmark = pytest.mark.usefixtures("one_thread")

V = 8
TRIALS = 2000
THRESHOLD = 0.05  # total variation; sampling noise at 2000 draws over 8 tokens is about 0.02
SMALL = {"window": 3, "ngram": 3, "candidates": 2}


@register("decoding", "_lookahead_argmax_claiming_q", lossless=False)
@dataclass
class ArgmaxClaimingQ(Lookahead):
    """Biased on purpose: takes each row's argmax but records the row as the distribution it was drawn from."""

    def _choose(self, state, logits):
        probs = state.sampler.probs(logits)
        return probs.argmax(dim=-1).tolist(), probs


@pytest.fixture(scope="module")
def tiny_vocab_model():
    model = random_model("llama", seed=3, vocab_size=V, num_hidden_layers=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # peaked enough that drafts get accepted, far from uniform
    return model


def run_recording_trees(model, spec, prompt):
    """Run the engine and keep every DraftTree the drafter proposed (aux block included)."""
    engine = Engine(model, spec)
    trees = []
    propose = engine.drafter.propose
    engine.drafter.propose = lambda state: trees.append(propose(state)) or trees[-1]
    return engine, list(engine.run(prompt)), trees


def test_the_window_mask_follows_the_paper():
    """W=2, N=4 once filled: level 0 is one node (column 1); levels 1 and 2 are aux, two columns each. Level
    l column c sees the pending token, level 0's columns 1..c and column c of levels 1..l [arXiv 2402.02057,
    fig. 2b]; its position is pending + l + c."""
    drafter = Lookahead(window=2, ngram=4)
    drafter._levels = [[11], [21, 22], [31, 32]]
    aux = drafter._aux(n_nodes=1)
    assert aux.tokens == [21, 22, 31, 32] and aux.offsets == [1, 2, 2, 3]
    # columns: pending, node 0 (level 0 col 1), aux (1,0), (1,1), (2,0), (2,1)
    expected = [[1, 0, 1, 0, 0, 0],
                [1, 1, 0, 1, 0, 0],
                [1, 0, 1, 0, 1, 0],
                [1, 1, 0, 1, 0, 1]]
    assert aux.mask.int().tolist() == expected


def test_aux_tokens_do_not_change_the_tree_rows_and_see_their_trajectory():
    """The verification rows of a forward with the lookahead branch equal those of the tree alone, and each
    window row equals the target run over that column's diagonal trajectory as an ordinary sequence."""
    model = varied_model("llama")
    _, _, trees = run_recording_trees(model, RunSpec(max_new_tokens=12, decode=TechniqueSpec("lookahead")),
                                      PROMPTS[0])
    tree = trees[-1]
    assert tree.aux is not None and len(tree.aux.tokens) == 2 * 5  # N - 2 = 2 levels of W = 5 columns
    tree.root = 7
    bare = type(tree)(tree.tokens, tree.parents, root=7)
    with_aux = model(torch.tensor(tree.forward_tokens()), tree.positions(20), mask=tree.attention_mask()).logits
    alone = model(torch.tensor(bare.forward_tokens()), bare.positions(20), mask=bare.attention_mask()).logits
    assert with_aux.shape[0] == len(tree) + 1 + len(tree.aux.tokens)
    torch.testing.assert_close(with_aux[: len(tree) + 1], alone, rtol=1e-4, atol=1e-4)  # matmul shapes differ
    # Each aux row is the target's prediction after its column's trajectory, run as a plain sequence.
    cols = 5
    for level in (1, 2):
        for c in range(cols):
            column = [tree.aux.tokens[(below - 1) * cols + c] for below in range(1, level + 1)]
            sequence = [7, *tree.tokens[:c], *column]
            plain = model(torch.tensor(sequence), torch.arange(20, 20 + len(sequence))).logits[-1]
            row = with_aux[len(tree) + 1 + (level - 1) * cols + c]
            torch.testing.assert_close(row, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_aux_slots_are_never_committed_or_recorded(tiny_vocab_model, temperature):
    prompt = [3, 4, 5, 3, 4]
    spec = RunSpec(max_new_tokens=30, temperature=temperature, decode=TechniqueSpec("lookahead"))
    _, events, trees = run_recording_trees(tiny_vocab_model, spec, prompt)
    assert len(trees) > 4 and sum(1 for t in trees if t.aux) >= len(trees) - 2  # full after N - 2 = 2 steps
    committed = 0
    for event, tree in zip(events[1:], trees):
        committed += len(event.tokens)
        # the cache holds the prompt and every committed token but the pending one: no aux, no rejected node
        # (the last step may cut its tokens at EOS or the budget after the cache committed them)
        if not event.finish_reason:
            assert event.cache_tokens == [len(prompt) + committed] * tiny_vocab_model.config.num_layers
        assert event.tree.tokens == tree.tokens and event.n_drafted == len(tree.tokens)
    assert sum(e.n_accepted for e in events) > 0


def test_greedy_output_equals_plain_decoding_in_another_configuration():
    model = varied_model("qwen3")
    decode = TechniqueSpec("lookahead", {"window": 3, "ngram": 5, "candidates": 2, "prompt_pool": False})
    for prompt in PROMPTS:
        plain = [t for e in Engine(model, RunSpec(max_new_tokens=40)).run(prompt) for t in e.tokens]
        ours = [t for e in Engine(model, RunSpec(max_new_tokens=40, decode=decode)).run(prompt) for t in e.tokens]
        assert ours == plain


def test_sampled_output_verified_by_matching_equals_plain_decoding():
    """With accept=match the window's draws (on the drafter's own generator) never touch the target's random
    stream, so the samples are plain decoding's, token for token."""
    model = varied_model("llama")
    spec = dict(max_new_tokens=40, temperature=0.8, top_p=0.95, seed=11)
    for prompt in PROMPTS:
        plain = [t for e in Engine(model, RunSpec(**spec)).run(prompt) for t in e.tokens]
        ours = [t for e in Engine(model, RunSpec(**spec, decode=TechniqueSpec("lookahead"),
                                                 accept=TechniqueSpec("match"))).run(prompt) for t in e.tokens]
        assert ours == plain


def test_sampling_is_reproducible_with_a_seed():
    model = varied_model("llama")
    spec = RunSpec(max_new_tokens=30, temperature=0.8, top_p=0.95, seed=5, decode=TechniqueSpec("lookahead"))
    first = [e.tokens for e in Engine(model, spec).run(PROMPTS[1])]
    again = [e.tokens for e in Engine(model, spec).run(PROMPTS[1])]
    assert first == again


def test_parameters_out_of_range_are_refused():
    with pytest.raises(SpecError, match="ngram"):
        RunSpec.parse("decode=lookahead:ngram=2").validated()
    with pytest.raises(SpecError, match="window"):
        RunSpec.parse("decode=lookahead:window=1").validated()


# --- sampled output follows the target's distribution -------------------------------------------------

def sampled_marginals(model, name: str, prompt: list[int], n: int) -> tuple[torch.Tensor, int]:
    """Empirical [n, V] marginals over seeded runs, and how many drafts with a real (not one-hot) q were
    accepted."""
    counts = torch.zeros(n, V)
    sjd_accepted = 0
    for seed in range(TRIALS):
        spec = RunSpec(max_new_tokens=n, temperature=1.0, seed=seed, decode=TechniqueSpec(name, SMALL))
        events = list(Engine(model, spec).run(prompt))
        for i, t in enumerate(t for e in events for t in e.tokens):
            counts[i, t] += 1
        sjd_accepted += sum(1 for e in events if e.tree for q, kept in zip(e.tree.draft_probs, e.tree.accepted)
                            if kept and q is not None and q < 1)
    return counts / TRIALS, sjd_accepted


def test_sampled_output_follows_the_target_and_a_biased_variant_fails(tiny_vocab_model):
    """Tokens 2-4 are drafted (level 0 with SJD's min(1, p/q), pool n-grams one-hot); their marginals over
    2000 seeds match the exact ones. The same test catches a variant whose recorded q is not what it drew."""
    prompt = [3, 4, 5, 3, 4]
    exact = exact_marginals(tiny_vocab_model, prompt, 4)
    ours, sjd_accepted = sampled_marginals(tiny_vocab_model, "lookahead", prompt, 4)
    assert sjd_accepted > TRIALS // 4  # the probabilistic acceptance is exercised, not just matching
    assert (tv(ours, exact) < THRESHOLD).all(), tv(ours, exact)
    biased, _ = sampled_marginals(tiny_vocab_model, "_lookahead_argmax_claiming_q", prompt, 4)
    assert tv(biased, exact).max() > 2 * THRESHOLD
