"""TriForce: lossless with a retrieval cache far smaller than the context, and the cache holds what it says."""

from __future__ import annotations

import pytest
import torch

from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")

SPARSE = {"budget": 16, "chunk": 4, "window": 4, "refresh": 2}


@pytest.fixture(scope="module")
def model():
    return varied_model("llama")


def prompt() -> list[int]:
    head = [int(t) for t in torch.randint(3, 500, (90,), generator=torch.Generator().manual_seed(1))]
    return head + head[:40]  # a repeat, so that the lookup level finds something


def run(model, decode: TechniqueSpec | None = None):
    spec = RunSpec(max_new_tokens=40) if decode is None else RunSpec(max_new_tokens=40, decode=decode)
    return list(Engine(model, spec).run(prompt()))


@pytest.mark.parametrize("params", [SPARSE, {**SPARSE, "lookup": 0}, {**SPARSE, "prefer": "recent"},
                                    {**SPARSE, "recycle": False, "confidence": 0.0}, {**SPARSE, "confidence": 0.9},
                                    {"budget": 24, "chunk": 1, "window": 8}])
def test_greedy_output_equals_plain_with_a_sparse_retrieval_cache(model, params):
    plain = [t for e in run(model) for t in e.tokens]
    events = run(model, TechniqueSpec("triforce", params))
    assert [t for e in events for t in e.tokens] == plain
    assert all(e.tree is not None for e in events[1:])  # every step verified a draft


def test_retrieval_cache_holds_sinks_best_chunks_and_window(model):
    from workbench.decoding.triforce import TriForce

    engine = Engine(model, RunSpec(max_new_tokens=3, decode=TechniqueSpec("triforce", SPARSE)))
    list(engine.run(prompt()))
    drafter = engine.drafter
    assert isinstance(drafter, TriForce)
    held = drafter._cache.layers[0].positions
    n = len(prompt()) + 1
    # budget 16 = sinks (chunk 0) + 2 chosen chunks of 4 + the window's 4 (and what came after the last full chunk)
    assert drafter.retrieval_tokens <= SPARSE["budget"] + SPARSE["chunk"]
    assert (held[:, :4] == torch.arange(4)).all()  # the attention sinks
    assert (held[:, -4:] >= n - 1 - 8).all()  # the recent window
    assert drafter.retrieval_tokens < n // 4


def test_bad_parameters_say_what_is_valid(model):
    with pytest.raises(SpecError, match="budget"):
        RunSpec(decode=TechniqueSpec("triforce", {"budget": 8, "window": 8, "chunk": 4})).validated()


def test_the_guess_tree_has_a_lookup_and_a_recycled_branch_sharing_their_start():
    from workbench.decoding.base import ROOT
    from workbench.decoding.ngram_index import NgramIndex
    from workbench.decoding.triforce import TriForce

    drafter = TriForce(k=8, lookup=3)
    drafter._index, drafter._next = NgramIndex(1, 3), [-1] * 100
    drafter._next[9], drafter._next[5], drafter._next[6] = 5, 6, 42  # recycled: 9 -> 5 -> 6 -> 42
    committed = [1, 9, 5, 6, 7, 2, 9]  # lookup: after the earlier 9 come 5, 6, 7
    tree = drafter._guesses(committed, [])
    assert tree.tokens == [5, 6, 7, 42] and tree.parents == [ROOT, 0, 1, 1]
    drafter.recycle = False
    assert drafter._guesses(committed, []).tokens == [5, 6, 7]
    # one token left to draft: it is the middle level's own, so nothing is proposed
    assert drafter._guesses(committed, [3] * 7).tokens == []


def test_drawing_with_guesses_follows_the_middle_levels_distribution():
    """Whatever the guesses, the token drawn is distributed as q (the target's acceptor relies on it)."""
    from workbench.decoding.triforce import TriForce

    drafter = TriForce()
    drafter._generator = torch.Generator().manual_seed(0)
    q = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    n = 20_000
    for guesses in ([], [3], [3, 0], [1, 4, 2]):
        counts = torch.bincount(torch.tensor([drafter._draw(q, guesses, greedy=False) for _ in range(n)]),
                                minlength=5)
        assert (counts / n - q).abs().max() < 0.015, (guesses, counts / n)
    assert drafter._draw(q, [3, 0], greedy=True) == 1


def test_the_targets_queries_are_tapped_only_before_a_rebuild(model):
    """An observed layer leaves the one-call layers, so only the verification whose queries the next rebuild
    reads is observed; the rest run unobserved."""
    from workbench.decoding.triforce import TriForce, _QueryTap

    engine = Engine(model, RunSpec(max_new_tokens=12, decode=TechniqueSpec("triforce", {**SPARSE, "refresh": 3})))
    observed = []
    propose = TriForce.propose

    def spy(self, state):
        tree = propose(self, state)
        observed.append((state.step, [isinstance(layer.observer, _QueryTap) for layer in state.cache.layers]))
        return tree

    TriForce.propose = spy
    try:
        list(engine.run(prompt()))
    finally:
        TriForce.propose = propose
    assert len(observed) >= 4
    for step, tapped in observed:
        assert tapped == [(step + 1) % 3 == 0] * len(tapped), (step, tapped)
