"""Token recycling: the tree template, the adjacency matrix updates and drafting from it."""

import pytest
import torch

from workbench.decoding.base import Acceptance, DraftTree
from workbench.decoding.token_recycling import TokenRecycling, tree_template
from workbench.engine import DecodeState
from workbench.errors import SpecError
from workbench.spec import RunSpec


def test_template_is_imbalanced_toward_first_ranked_nodes():
    # depth 1: 3 children of the root; depth 2: rank 0 gets 2, rank 1 gets 1, rank 2 none; depth first, so the
    # first-ranked chain takes consecutive slots
    assert tree_template([3, 2]) == [(-1, 0), (0, 0), (0, 1), (-1, 1), (3, 0), (-1, 2)]
    assert [rank for _, rank in tree_template([2, 1, 1, 1])[:4]] == [0, 0, 0, 0]


class _Model:
    class config:  # noqa: N801
        vocab_size = 20


def test_drafts_from_recycled_candidates():
    drafter = TokenRecycling(widths="2-1", k=2)
    state = DecodeState(_Model(), None, None, [1, 2], [3])
    drafter.begin(state)
    assert len(drafter.propose(state)) == 0  # nothing recycled yet
    # A verification over root 3 and nodes 7, 8 saw these top candidates: 3 -> (5, 6), 7 -> (9, 4)
    logits = torch.zeros(3, 20)
    logits[0, 5], logits[0, 6] = 2.0, 1.0
    logits[1, 9], logits[1, 4] = 2.0, 1.0
    tree = DraftTree([7, 8], [-1, -1], root=3)
    drafter.observe(state, tree, Acceptance([], 5), logits)
    state.generated = [3, 7]  # pending is now 7
    drafted = drafter.propose(state)
    assert drafted.tokens == [9, 4] and drafted.parents == [-1, -1]
    state.generated = [3]  # from 3: children 5, 6; the first-ranked child 5 has no candidates yet
    assert drafter.propose(state).tokens == [5, 6]


def test_with_context_a_seen_pair_drafts_from_its_own_candidates():
    drafter = TokenRecycling(widths="2", k=2, context=2)
    state = DecodeState(_Model(), None, None, [1, 2], [3])
    drafter.begin(state)
    drafter._matrix[3] = torch.tensor([5, 6])  # what followed 3 last time, whatever came before it
    assert drafter.propose(state).tokens == [5, 6]  # the pair (2, 3) was never seen: the matrix's row
    # a verification over root 3 (after 2) and nodes 7, 8: 3 -> (9, 4); 7 and 8 (each after 3) -> (10, 11)
    logits = torch.zeros(3, 20)
    logits[0, 9], logits[0, 4] = 2.0, 1.0
    logits[1:, 10], logits[1:, 11] = 2.0, 1.0
    tree = drafter.propose(state)
    tree.tokens, tree.root = [7, 8], 3
    drafter.observe(state, tree, Acceptance([], 9), logits)
    assert drafter._contexts[(2, 3)] == (9, 4) and drafter._contexts[(3, 7)] == (10, 11)
    state.prompt_ids, state.generated = [1, 2], [3]
    assert drafter.propose(state).tokens == [9, 4]  # the pair's candidates
    state.prompt_ids = [1, 8]  # 3 after 8: a pair never seen, so the matrix's row (now 9, 4 too)
    drafter._matrix[3] = torch.tensor([6, 5])
    assert drafter.propose(state).tokens == [6, 5]


def test_the_context_table_keeps_the_most_recently_updated(monkeypatch):
    import workbench.decoding.token_recycling as token_recycling

    monkeypatch.setattr(token_recycling, "MAX_CONTEXTS", 3)
    drafter = TokenRecycling(k=2, context=2, hot_start=False)
    drafter.begin(DecodeState(_Model(), None, None, [1], [2]))
    drafter._remember([(1, 2), (2, 3), (3, 4)], [[5, 6]] * 3)
    drafter._remember([(1, 2), (4, 5)], [[7, 8], [9, 10]])  # (1, 2) updated, so (2, 3) is the oldest
    assert list(drafter._contexts) == [(3, 4), (1, 2), (4, 5)] and drafter._contexts[(1, 2)] == (7, 8)


def test_a_longer_context_backs_off_to_shorter_ones_then_to_the_matrix():
    drafter = TokenRecycling(widths="1", k=2, context=3)
    state = DecodeState(_Model(), None, None, [1, 2], [3])  # tail (1, 2, 3)
    drafter.begin(state)
    drafter._matrix[3] = torch.tensor([5, 6])
    assert drafter.propose(state).tokens == [5]  # nothing seen: the matrix
    drafter._remember([(9, 2, 3)], [[7, 8]])  # stores (2, 3) and (9, 2, 3)
    assert drafter.propose(state).tokens == [7]  # (1, 2, 3) unseen, (2, 3) seen
    drafter._remember([(1, 2, 3)], [[4, 8]])
    assert drafter.propose(state).tokens == [4]  # the longest run seen wins
    assert set(drafter._contexts) == {(2, 3), (9, 2, 3), (1, 2, 3)}


def test_another_k_starts_both_tables_again():
    memory = {}
    small = TokenRecycling(k=2, context=2, hot_start=True)
    small.begin(DecodeState(_Model(), None, None, [1], [2], memory=memory))
    small._remember([(1, 2)], [[5, 6]])
    wide = TokenRecycling(widths="3", k=4, context=2, hot_start=True)
    state = DecodeState(_Model(), None, None, [1], [2], memory=memory)
    wide.begin(state)
    assert memory["token_recycling"].shape == (20, 4) and memory["token_recycling:contexts"] == {}
    assert wide.propose(state).tokens == []  # no 2-candidate row left to read a third rank from


@pytest.mark.parametrize("widths", ["", "2-x", "0-1", "9"])
def test_bad_widths_are_refused(widths):
    with pytest.raises(SpecError, match="widths"):
        RunSpec.parse(f"decode=token_recycling:widths={widths}").validated()


def test_hot_start_keeps_the_matrix_across_runs_of_a_model():
    from workbench.engine import Engine
    from workbench.spec import TechniqueSpec

    from .helpers import varied_model

    model, memory = varied_model(), {}
    prompt = [5, 6, 7, 8, 9, 10, 5, 6]
    hot = RunSpec(max_new_tokens=12, decode=TechniqueSpec("token_recycling", {"prompt": False, "hot_start": True}))
    engines = [Engine(model, hot, memory=memory) for _ in range(2)]
    first, second = (list(e.run(prompt)) for e in engines)
    cold_engine = Engine(model, RunSpec(max_new_tokens=12, decode=TechniqueSpec(
        "token_recycling", {"prompt": False})), memory=memory)
    cold = list(cold_engine.run(prompt))
    assert first[1].tree is None and cold[1].tree is None  # nothing recycled yet at the first decode step
    assert second[1].tree is not None  # the matrix came from the first run
    assert [e.drafter.warm_started for e in engines] == [False, True] and not cold_engine.drafter.warm_started
    tokens = lambda events: [t for e in events for t in e.tokens]  # noqa: E731
    assert tokens(second) == tokens(first)  # the output does not depend on it


def test_the_prompts_candidates_are_recycled_from_the_prefill(monkeypatch):
    import workbench.decoding.token_recycling as token_recycling
    from workbench.engine import Engine, build_cache
    from workbench.spec import TechniqueSpec

    from .helpers import varied_model

    monkeypatch.setattr(token_recycling, "PROMPT_CHUNK", 3)  # the prompt's 7 distinct tokens in three chunks
    model = varied_model()
    prompt = [5, 6, 7, 8, 9, 10, 5, 11]
    with torch.inference_mode():  # the target's top candidates after each prompt token
        top = model(torch.tensor(prompt), torch.arange(len(prompt)), build_cache(model, [], 16)).logits.topk(8).indices
    memory = {}
    spec = RunSpec(max_new_tokens=4, decode=TechniqueSpec("token_recycling", {"widths": "3", "hot_start": True}))
    prefill = next(Engine(model, spec, memory=memory).run(prompt))  # the matrix is filled by now
    matrix = memory["token_recycling"]
    assert torch.equal(matrix[6], top[1]) and torch.equal(matrix[11], top[7])
    assert torch.equal(matrix[5], top[6])  # a repeated token keeps its last occurrence's candidates
    assert prefill.tokens == [int(top[7][0])]  # the prefill's own choice is unchanged
    off = {}
    next(Engine(model, RunSpec(max_new_tokens=4, decode=TechniqueSpec("token_recycling", {"prompt": False,
                                                                                    "hot_start": True})),
                memory=off).run(prompt))
    assert (off["token_recycling"] == -1).all()
    with_pairs = {}
    next(Engine(model, RunSpec(max_new_tokens=4, decode=TechniqueSpec("token_recycling", {"context": 2,
                                                                                    "hot_start": True})),
                memory=with_pairs).run(prompt))
    assert torch.equal(with_pairs["token_recycling"], matrix)  # the same rows per token
    pairs = with_pairs["token_recycling:contexts"]
    assert set(pairs) == {(a, b) for a, b in zip(prompt, prompt[1:])}
    assert pairs[(5, 6)] == tuple(top[1].tolist()) and pairs[(10, 5)] == tuple(top[6].tolist())


def test_the_papers_tree_has_its_levels_and_the_depth_first_order():
    from collections import Counter

    from workbench.decoding.token_recycling import PAPER_TREE, layered_template

    template = layered_template(PAPER_TREE)
    tree = DraftTree([0] * len(template), [parent for parent, _ in template])
    assert len(template) == 80 and sorted(Counter(tree.depths()).items()) == [
        (1, 8), (2, 21), (3, 25), (4, 15), (5, 8), (6, 3)]
    assert [len(tree.children()[c]) for c in tree.children()[-1]] == list(PAPER_TREE[1])
    assert [rank for _, rank in template[:6]] == [0] * 6  # the first-ranked chain first, in consecutive slots
    assert layered_template(((2,), (2, 1), (1, 0, 1))) == tree_template([2, 2, 1])  # the same tree both ways
    with pytest.raises(ValueError, match="a level of 3 counts under 2 nodes"):
        layered_template(((2,), (1, 1, 1)))


def test_the_paper_preset_is_the_papers_method():
    spec = RunSpec.parse("decode=token_recycling:preset=paper").validated()
    assert spec.to_string() == "decode=token_recycling:preset=paper"  # the spec records the preset by name
    drafter = spec.decode.build("decoding")
    assert (drafter.widths, drafter.context, drafter.prompt, drafter.hot_start) == ("paper", 1, False, False)
    assert RunSpec.parse("decode=token_recycling:preset=paper,context=1,hot_start=true").validated()
    with pytest.raises(SpecError, match="preset=paper sets context=1, prompt=false; drop context, prompt or"):
        RunSpec.parse("decode=token_recycling:preset=paper,context=2,prompt=true").validated()
    with pytest.raises(SpecError, match="widest node has 8 children"):
        RunSpec.parse("decode=token_recycling:preset=paper,k=4").validated()
    default = RunSpec.parse("decode=token_recycling").decode.build("decoding")
    assert (default.preset, default.widths, default.context, default.prompt) == ("extended", "2-1-1-1", 2, True)


@pytest.mark.usefixtures("one_thread")
def test_the_paper_preset_drafts_its_tree_and_keeps_plain_decodings_output():
    from workbench.engine import Engine
    from workbench.spec import TechniqueSpec

    from .helpers import PROMPTS, varied_model

    model = varied_model()
    spec = RunSpec(max_new_tokens=30, decode=TechniqueSpec("token_recycling", {"preset": "paper"}))
    for prompt in PROMPTS:
        plain = [t for e in Engine(model, RunSpec(max_new_tokens=30)).run(prompt) for t in e.tokens]
        events = list(Engine(model, spec).run(prompt))
        assert [t for e in events for t in e.tokens] == plain
        assert max(len(e.tree.tokens) for e in events if e.tree) > 40  # the wide tree, once the matrix fills
