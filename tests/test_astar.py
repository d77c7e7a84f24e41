"""A*-decoding: best-first search per segment under a budget, scored by the model's own log-probability; lossy."""

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


def test_it_is_labelled_lossy_and_says_it_has_no_reward_model():
    technique = get("decoding", "astar")
    assert not technique.lossless and not RunSpec.parse("decode=astar").lossless
    assert "no reward model" in technique.summary


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_budget_of_one_is_greedy_decoding(prompt):
    model = varied_model()
    assert _tokens(model, "max_new_tokens=16;decode=astar:budget=1", prompt) == \
        _tokens(model, "max_new_tokens=16", prompt)


def test_with_budget_enough_the_segment_is_the_most_likely_path_of_the_searched_tree():
    model = varied_model()
    prompt = PROMPTS[1]
    engine = Engine(model, RunSpec.parse("max_new_tokens=3;decode=astar:depth=2,branch=3,budget=50"))
    first, *segment = [t for e in engine.run(prompt) for t in e.tokens]

    def logp(tokens):
        out = model(torch.tensor(tokens), torch.arange(len(tokens)))
        return torch.log_softmax(out.logits.float(), -1)[-1]

    context = prompt + [first]
    root = logp(context)
    paths = {}
    for a in root.topk(3).indices.tolist():
        after = logp(context + [a])
        for b in after.topk(3).indices.tolist():
            paths[(a, b)] = float(root[a] + after[b])
    best = max(paths, key=paths.get)
    assert segment == list(best)
    greedy = _tokens(model, "max_new_tokens=3", prompt)[1:]
    assert segment != greedy and paths[best] > paths[tuple(greedy)]  # the search beat greedy's path here
    assert engine.drafter.expansions >= 4  # the root (a scratch forward on the first step), then its 3 children


def test_departures_are_recorded_against_plain_decoding():
    model = varied_model()
    events = list(Engine(model, RunSpec.parse("max_new_tokens=16;decode=astar:depth=3,budget=12")).run(PROMPTS[1]))
    assert all(len(e.target_argmax) == len(e.tokens) for e in events)
    assert sum(len(e.tokens) for e in events) == 16 and len(events) < 16  # segments of several tokens per step


def test_bad_parameters_get_a_plain_error():
    with pytest.raises(SpecError, match="budget=0 is out of range"):
        RunSpec.parse("decode=astar:budget=0").validated()
    with pytest.raises(SpecError, match="no parameter 'beam'"):
        RunSpec.parse("decode=astar:beam=2").validated()


def test_cli_lists_it_lossy_and_its_run_json_says_lossless_false(capsys):
    assert main(["list", "--json"]) == 0
    listed = {(t["category"], t["name"]): t for t in json.loads(capsys.readouterr().out)}
    assert listed[("decoding", "astar")]["lossless"] is False
    assert main(["generate", "5 6 7 8", "--model", "random:llama", "--dtype", "float32", "--max-new-tokens", "6",
                 "--decode", "astar", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["lossless"] is False and result["departures"] is not None


def test_its_search_forwards_count_as_target_forwards_beside_the_verifications(tmp_path):
    """A* commits several tokens per verification, but each expansion is a forward of the whole target: the
    summary's tokens per target forward counts them, the mean accepted length does not."""
    from workbench import Workbench
    from workbench.store import Reader, Store
    from workbench.views.replay import load_trace

    wb = Workbench("random:llama", dtype="float32")
    with Store(tmp_path / "runs.duckdb") as store:
        wb.store = store
        trace = wb.generate("5 6 7 8", "max_new_tokens=12;decode=astar:depth=3,budget=4")
        plain = wb.generate("5 6 7 8", "max_new_tokens=12").summary()
        s = trace.summary()
        searched = sum(e.drafter_forwards for e in trace.events)
        assert searched > 0 and s["drafter_forwards"] == searched
        assert s["tokens_per_target_forward"] == s["n_new_tokens"] / (s["target_forwards"] + searched)
        assert s["tokens_per_target_forward"] < s["mean_accepted_length"]
        assert plain["drafter_forwards"] == 0 and plain["tokens_per_target_forward"] == plain["mean_accepted_length"]
        row = store.con.execute("SELECT drafter_forwards, tokens_per_target_forward FROM run_summary "
                                "WHERE run_id = ?", [trace.run_id]).fetchone()
        assert row == (searched, s["tokens_per_target_forward"])
    with Reader(tmp_path / "runs.duckdb") as reader:
        assert load_trace(reader.query, trace.run_id).summary()["drafter_forwards"] == searched


def test_the_stats_line_shows_the_search_forwards():
    from workbench.views.tokens import forwards_markdown

    line = forwards_markdown({"n_new_tokens": 12, "target_forwards": 4, "drafter_forwards": 8,
                              "tokens_per_target_forward": 1.0})
    assert "12 tokens in 4 forwards" in line and "+8 the drafter ran" in line and "**1.00** tokens per" in line
    assert forwards_markdown({"n_new_tokens": 3, "target_forwards": 3, "drafter_forwards": 0}) == \
        "3 tokens in 3 forwards"
