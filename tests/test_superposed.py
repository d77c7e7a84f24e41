"""Superposed Decoding: k drafts from one forward per position over their superposed embeddings; lossy."""

import json

import pytest
import torch

from workbench.cli import main
from workbench.decoding.base import ROOT, DraftTree
from workbench.decoding.superposed import SuperposedAcceptance, SuperposedDrafter
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.registry import get
from workbench.sampling import Sampler
from workbench.spec import RunSpec

from .helpers import PROMPTS, varied_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(model, spec: str, prompt: list[int]) -> list[int]:
    return [t for e in Engine(model, RunSpec.parse(spec)).run(prompt) for t in e.tokens]


def test_it_is_labelled_lossy():
    assert not get("decoding", "superposed").lossless and not get("acceptance", "superposed").lossless
    assert not RunSpec.parse("decode=superposed").lossless


def test_a_superposed_input_is_the_weighted_sum_of_embeddings():
    model = varied_model()
    tokens = torch.tensor([5, 9])
    plain = model(tokens, torch.arange(2)).logits
    assert torch.allclose(model(tokens, torch.arange(2), embeds=model.embed(tokens)).logits, plain)
    mixed = 0.25 * model.embed(torch.tensor([5])) + 0.75 * model.embed(torch.tensor([9]))
    assert not torch.allclose(model(tokens[:1], torch.arange(1), embeds=mixed).logits, plain[:1])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_one_draft_without_the_ngram_model_is_greedy_decoding(prompt):
    model = varied_model()
    assert _tokens(model, "max_new_tokens=14;decode=superposed:k=1,alpha=0", prompt) == \
        _tokens(model, "max_new_tokens=14", prompt)


def test_k_drafts_reach_the_target_as_a_tree_and_one_whole_draft_is_committed():
    model = varied_model()
    events = list(Engine(model, RunSpec.parse("max_new_tokens=16;decode=superposed:k=3,length=4")).run(PROMPTS[1]))
    middle = events[1:-1]
    assert all(max(e.tree.depths) == 4 and e.tree.depths.count(4) == 3 for e in middle)  # 3 drafts of 4 tokens
    assert all(e.n_accepted == 4 for e in middle)  # a whole draft, then the target's token
    assert sum(t != a for e in events for t, a in zip(e.tokens, e.target_argmax)) > 0  # departures recorded


def test_the_acceptor_picks_the_draft_the_target_scores_highest_or_the_top_one():
    tree = DraftTree.trie([[1, 2], [1, 3], [0, 2]])
    assert tree.tokens == [1, 2, 3, 0, 2] and tree.parents == [ROOT, 0, 0, ROOT, 3]
    logits = torch.zeros(6, 4)
    logits[1, 3] = 5.0  # after node 0 (token 1) the target likes 3: draft [1, 3] scores highest
    logits[3, 1] = 2.0  # the bonus: the target's token after node 2 (row 3)
    best = SuperposedAcceptance().accept(tree, logits, logits.softmax(-1), Sampler())
    assert best.accepted == [0, 2] and best.bonus == 1
    top = SuperposedAcceptance(pick="top").accept(tree, logits, logits.softmax(-1), Sampler())
    assert top.accepted == [0, 1]
    assert SuperposedAcceptance().accept(DraftTree(), logits[:1], logits[:1].softmax(-1), Sampler()).accepted == []


def test_the_ngram_model_follows_the_drafts_own_context():
    drafter = SuperposedDrafter(alpha=1.0, ngram=3)
    drafter._index([4, 5, 6, 4, 5, 7])
    p = drafter._interpolate(torch.full((8,), 1 / 8), [9, 4, 5])
    assert p[6] == pytest.approx(0.5) and p[7] == pytest.approx(0.5)  # 4 5 -> 6 once, 7 once
    unseen = drafter._interpolate(torch.full((8,), 1 / 8), [1, 2])
    assert torch.equal(unseen, torch.full((8,), 1 / 8))  # no context seen: the model alone


def test_bad_parameters_get_a_plain_error():
    with pytest.raises(SpecError, match="k=0 is out of range"):
        RunSpec.parse("decode=superposed:k=0").validated()
    with pytest.raises(SpecError, match="pick='best' is not allowed"):
        RunSpec.parse("decode=superposed;accept=superposed:pick=best").validated()
    with pytest.raises(SpecError, match="layers=9 but the model has 4 layers"):
        list(Engine(varied_model(), RunSpec.parse("decode=superposed:layers=9")).run([1, 2, 3]))


def test_cli_lists_it_lossy_and_its_run_json_says_lossless_false(capsys):
    assert main(["list", "--json"]) == 0
    listed = {(t["category"], t["name"]): t for t in json.loads(capsys.readouterr().out)}
    assert listed[("decoding", "superposed")]["lossless"] is False
    assert listed[("acceptance", "superposed")]["lossless"] is False
    assert main(["generate", "5 6 7 8", "--model", "random:llama", "--dtype", "float32", "--max-new-tokens", "6",
                 "--decode", "superposed", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["lossless"] is False and result["departures"] is not None
