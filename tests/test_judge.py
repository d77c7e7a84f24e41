"""Judge Decoding: the judge head trains in seconds on a tiny model; at threshold 1 the acceptor is matching,
at threshold 0 it keeps every draft; missing checkpoints and bad parameters get plain errors."""

import time

import pytest
import torch

from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.registry import get
from workbench.spec import RunSpec, TechniqueSpec
from workbench.training.judge import train_judge

from .helpers import PROMPTS, varied_model

pytestmark = pytest.mark.usefixtures("throwaway_checkpoints")
DRAFT = TechniqueSpec("draft_model", {"layers": 1, "k": 3})


@pytest.fixture(scope="module")
def model():
    return varied_model()


@pytest.fixture(scope="module")
def trained(model, throwaway_checkpoints, module_one_thread):
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (8,), generator=generator).tolist() for _ in range(10)]
    start = time.perf_counter()
    report = train_judge(model, prompts, minutes=1, new_tokens=12, positions=12, batch=64, max_steps=150,
                         progress=False)
    return report, time.perf_counter() - start


def run(model, accept: dict, temperature: float = 0.0):
    spec = RunSpec(max_new_tokens=20, decode=DRAFT, accept=TechniqueSpec("judge", accept), temperature=temperature,
                   seed=5)
    return list(Engine(model, spec).run(PROMPTS[1]))


def tokens(events) -> list[int]:
    return [t for e in events for t in e.tokens]


def test_the_judge_trains_in_seconds_and_learns(trained):
    report, seconds = trained
    assert seconds < 60 and report["steps"] == 150  # seconds on a quiet machine; a loaded one gets headroom
    curve = [loss for _, _, loss in report["curve"]]
    assert curve[-1] < 0.8 * curve[0]  # it learned something from the labels
    assert 0 < report["train_correct_share"] < 1  # both labels occur
    assert {r["threshold"] for r in report["held_out_non_greedy"]} == {0.5, 0.7, 0.9}


@pytest.mark.usefixtures("trained")
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_threshold_one_is_lossless_matching(model, temperature):
    matching_spec = RunSpec(max_new_tokens=20, decode=DRAFT, accept=TechniqueSpec("match"), temperature=temperature,
                            seed=5)
    matched = tokens(Engine(model, matching_spec).run(PROMPTS[1]))
    judged = tokens(run(model, {"threshold": 1.0}, temperature))
    assert judged == matched
    if temperature == 0:
        plain = tokens(Engine(model, RunSpec(max_new_tokens=20)).run(PROMPTS[1]))
        assert judged == plain


@pytest.mark.usefixtures("trained")
def test_threshold_zero_keeps_every_draft_and_departs_from_plain(model):
    events = run(model, {"threshold": 0.0})
    drafted = [e for e in events if e.tree]
    assert drafted and all(e.n_accepted == e.n_drafted for e in drafted)
    departures = sum(a != t for e in events for a, t in zip(e.target_argmax, e.tokens))
    assert departures > 0  # a one-layer draft's tokens are not all the target's argmax


@pytest.mark.usefixtures("trained")
def test_a_middle_threshold_accepts_more_than_matching(model):
    judged = sum(e.n_accepted for e in run(model, {"threshold": 0.5}))
    matched = sum(e.n_accepted for e in run(model, {"threshold": 1.0}))
    assert judged > matched  # drafts the target would not have picked, kept on the judge's word


def test_labelled_lossy_and_errors_are_plain(model):
    assert not get("acceptance", "judge").lossless
    assert not RunSpec.parse("decode=prompt_lookup;accept=judge").validated().lossless
    with pytest.raises(SpecError, match="threshold=2.0 is out of range"):
        RunSpec.parse("accept=judge:threshold=2").validated()
    with pytest.raises(SpecError, match="no judge trained for this model"):
        list(Engine(model, RunSpec.parse("accept=judge:width=7;max_new_tokens=2")).run([1, 2, 3]))



def test_workbench_train_judge_then_run_it(capsys):
    from workbench.cli import main

    assert main(["train", "judge", "--model", "random:llama", "--minutes", "0.2", "--prompts", "4", "--new-tokens",
                 "8", "--max-steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "trained the judge head" in out and "run it with --accept judge" in out
    from workbench.api import Workbench

    trace = Workbench("random:llama").generate("5 6 7", "decode=draft_model:layers=1;accept=judge;max_new_tokens=6")
    assert len(trace.token_ids) == 6 and trace.summary()["lossless"] is False
