"""Prompt lookup: what it proposes, and that it saves target forwards when the output copies the input."""

import pytest

from workbench.decoding.ngram_index import NgramIndex
from workbench.decoding.prompt_lookup import PromptLookup
from workbench.engine import DecodeState, Engine
from workbench.errors import SpecError
from workbench.models.random import random_model
from workbench.spec import RunSpec, TechniqueSpec


def propose(drafter, tokens):
    state = DecodeState(None, None, None, tokens[:1], tokens[1:])
    drafter.begin(state)
    return drafter.propose(state)


def test_copies_what_followed_the_longest_matching_ngram():
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3]
    # the 3-gram (6, 2, 3) never occurred, (2, 3) did, at 1 and 5: the first is followed by 4 9 2 ...
    assert propose(PromptLookup(k=3, shrink=0), tokens).tokens == [4, 9, 2]
    assert propose(PromptLookup(k=3, shrink=0, prefer="recent"), tokens).tokens == [5, 6, 2]
    assert propose(PromptLookup(k=3, max_ngram=3, min_ngram=3), tokens).tokens == []


def test_shorter_matches_propose_shorter_drafts_with_shrink():
    #        0  1  2  3  4  5  6  7  8  9 10 11 12 13
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5]
    long_match = tokens[:-2] + [1, 2, 3]  # the 3-gram (1, 2, 3) occurred at 0: followed by 4 5 6 7 8 ...
    assert propose(PromptLookup(k=5, shrink=2), long_match).tokens == [4, 5, 6, 7, 8]
    one_token = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 2]  # only the 1-gram (2) matches: 5 - 2 * 2 tokens
    assert propose(PromptLookup(k=5, shrink=2), one_token).tokens == [3]
    assert propose(PromptLookup(k=5, shrink=9), one_token).tokens == [3]  # at least one
    assert propose(PromptLookup(k=5, shrink=0), one_token).tokens == [3, 4, 5, 6, 7]


def test_chain_stops_at_the_end_of_the_text():
    tokens = [7, 8, 7]
    tree = propose(PromptLookup(k=5, shrink=0), tokens)
    assert tree.tokens == [8, 7] and tree.is_chain()


def test_index_is_updated_incrementally():
    drafter = PromptLookup(k=2, shrink=0)
    state = DecodeState(None, None, None, [1, 2, 3], [4])
    drafter.begin(state)
    assert drafter.propose(state).tokens == []
    state.generated += [1, 2]  # now ... 4 1 2: the 2-gram (1, 2) occurred at the start
    assert drafter.propose(state).tokens == [3, 4]


def test_the_ngram_index_finds_the_longest_match_first_or_latest():
    index = NgramIndex(1, 3)
    tokens = [5, 6, 7, 1, 5, 6, 9, 5, 6]
    index.update(tokens)
    assert index.match(tokens) == (2, 0)  # (5, 6) first starts at 0; the last one, at 7, is the query itself
    assert index.match(tokens, "recent") == (2, 4)
    assert index.match([5, 6, 7]) == (3, 0) and index.match([8, 7]) == (1, 2) and index.match([8]) is None
    index.update(tokens + [3])  # incremental: the n-grams ending at the old last token join the index
    assert index.match([9, 5, 6], "recent") == (3, 6) and index.grams[1][(6,)] == [1, 5, 8]


def test_bad_parameters_are_refused():
    with pytest.raises(SpecError, match="min_ngram .* must not exceed max_ngram"):
        RunSpec.parse("decode=prompt_lookup:min_ngram=4,max_ngram=2").validated()


def test_saves_forwards_when_the_output_repeats_the_prompt():
    model = random_model("llama", seed=3)
    prompt = [9, 8, 7, 6, 5, 4, 3]
    plain = list(Engine(model, RunSpec(max_new_tokens=48)).run(prompt))
    tokens = [t for e in plain for t in e.tokens]
    # Prompt = the plain output itself, then its start again: the continuation is all in the prompt.
    echo = prompt + tokens + prompt
    plain_echo = list(Engine(model, RunSpec(max_new_tokens=32)).run(echo))
    lookup = list(Engine(model, RunSpec(max_new_tokens=32, decode=TechniqueSpec("prompt_lookup"))).run(echo))
    assert [t for e in lookup for t in e.tokens] == [t for e in plain_echo for t in e.tokens]
    assert sum(e.n_accepted for e in lookup) > 0 and len(lookup) < len(plain_echo)
