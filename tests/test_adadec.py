"""AdaDec: greedy while the target is sure, a lookahead rerank where it is not; lossy and labelled so."""

import json

import pytest
import torch

from workbench.cli import main
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.registry import get
from workbench.spec import RunSpec

from .helpers import PROMPTS, varied_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(model, spec: str, prompt: list[int]) -> list[int]:
    return [t for e in Engine(model, RunSpec.parse(spec)).run(prompt) for t in e.tokens]


def test_it_is_labelled_lossy():
    assert not get("decoding", "adadec").lossless and not get("acceptance", "decided").lossless
    assert not RunSpec.parse("decode=adadec").lossless


@pytest.mark.parametrize("prompt", PROMPTS)
def test_an_infinite_threshold_never_pauses_and_is_greedy_decoding(prompt):
    model = varied_model()
    engine = Engine(model, RunSpec.parse("max_new_tokens=16;decode=adadec:threshold=inf"))
    tokens = [t for e in engine.run(prompt) for t in e.tokens]
    assert tokens == _tokens(model, "max_new_tokens=16", prompt)
    assert engine.drafter.pauses == 0


def test_a_pause_keeps_the_candidate_whose_greedy_lookahead_scores_best():
    model = varied_model()
    prompt = [int(t) for t in torch.randint(3, 500, (12,), generator=torch.Generator().manual_seed(0))]
    # threshold 0: the second token is decided at a pause (the first comes from the prefill)
    engine = Engine(model, RunSpec.parse("max_new_tokens=2;decode=adadec:threshold=0,candidates=3,lookahead=3"))
    first, chosen = [t for e in engine.run(prompt) for t in e.tokens]
    assert engine.drafter.pauses == 1
    # the same score worked out independently: full forwards without a cache, greedy continuations
    def logp(tokens):
        out = model(torch.tensor(tokens), torch.arange(len(tokens)))
        return torch.log_softmax(out.logits.float(), -1)

    context = prompt + [first]
    candidates = logp(context)[-1].topk(3).indices.tolist()
    scores = []
    for c in candidates:
        seq, score = context + [c], float(logp(context)[-1, c])
        for _ in range(3):
            row = logp(seq)[-1]
            seq.append(int(row.argmax()))
            score += float(row.max())
        scores.append(score)
    assert chosen == candidates[max(range(3), key=scores.__getitem__)]
    assert chosen != candidates[0]  # on this prompt the lookahead overrules the argmax


def test_every_position_pauses_at_a_zero_threshold_and_departures_are_recorded():
    model = varied_model()
    engine = Engine(model, RunSpec.parse("max_new_tokens=12;decode=adadec:threshold=0,lookahead=2"))
    events = list(engine.run(PROMPTS[1]))
    assert engine.drafter.pauses == 11  # every token but the prefill's
    assert all(len(e.target_argmax) == len(e.tokens) for e in events)
    assert sum(t != a for e in events for t, a in zip(e.tokens, e.target_argmax)) > 0


def test_bad_parameters_get_a_plain_error():
    with pytest.raises(SpecError, match="candidates=1 is out of range"):
        RunSpec.parse("decode=adadec:candidates=1").validated()
    with pytest.raises(SpecError, match="threshold=-1.0 is out of range"):
        RunSpec.parse("decode=adadec:threshold=-1").validated()


def test_cli_lists_it_lossy_and_its_run_json_says_lossless_false(capsys):
    assert main(["list", "--json"]) == 0
    listed = {(t["category"], t["name"]): t for t in json.loads(capsys.readouterr().out)}
    assert listed[("decoding", "adadec")]["lossless"] is False
    assert listed[("acceptance", "decided")]["lossless"] is False
    assert main(["generate", "5 6 7 8", "--model", "random:llama", "--dtype", "float32", "--max-new-tokens", "6",
                 "--decode", "adadec:threshold=0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["lossless"] is False and result["departures"] is not None


def test_decided_acceptance_commits_the_chain_with_its_last_token_as_the_bonus_and_refuses_trees():
    from workbench.decoding.base import DraftTree
    from workbench.decoding.decided import DecidedAcceptance
    from workbench.sampling import Sampler

    logits = torch.zeros(4, 8)
    logits[:, 0] = 5.0  # the target would pick 0 everywhere
    out = DecidedAcceptance().accept(DraftTree.chain([3, 4, 5]), logits, logits.softmax(-1), Sampler())
    assert out.accepted == [0, 1] and out.bonus == 5
    with pytest.raises(SpecError, match="commits a chain"):
        DecidedAcceptance().accept(DraftTree([1, 2], [-1, -1]), logits[:3], logits[:3].softmax(-1), Sampler())
