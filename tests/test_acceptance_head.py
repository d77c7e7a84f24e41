"""SpecDec++'s trained acceptance head: trained in seconds on a tiny model, then deciding the draft length.

It only decides how many tokens the wrapped draft proposes, so the output stays plain decoding's (greedy) and
the target's distribution (sampled); both are checked here, with the head trained.
"""

from __future__ import annotations

import json

import pytest
import torch

from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec
from workbench.testing import PROMPT, exact_marginals, sampled, tiny_model, tv, tv_bound
from workbench.training.acceptance_head import train_acceptance_head

pytestmark = pytest.mark.usefixtures("throwaway_checkpoints", "one_thread")

DRAFTER = "draft_model:layers=2"
TRAINED = {"drafter": DRAFTER, "head": "trained", "max_k": 6}
TRIALS = 500


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def report(model, throwaway_checkpoints, module_one_thread):
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, (6,), generator=generator).tolist() for _ in range(24)]
    return train_acceptance_head(model, prompts, DRAFTER, minutes=3, new_tokens=16, max_steps=150, progress=False)


def run(model, params, **spec):
    spec = RunSpec(max_new_tokens=24, decode=TechniqueSpec("adaptive", params), **spec).validated()
    events = list(Engine(model, spec).run(PROMPT))
    return [t for e in events for t in e.tokens], [len(e.tree.tokens) for e in events if e.tree]


def test_training_lowers_the_loss_and_ranks_accepted_drafts_first(report):
    assert report["curve"][-1][2] < 0.9 * report["curve"][0][2]
    assert report["settings"] == {"draft": "self", "layers": 2, "compress": ""}
    held = report["held_out"]
    assert 0 < held["accepted_share"] < 1 and held["examples"] > 10
    assert held["auc"] > 0.55  # the head orders held-out drafts by acceptance better than chance (0.5)


def test_greedy_output_is_plain_decodings_and_the_head_sets_the_length(model, report):
    spec = RunSpec(max_new_tokens=24).validated()
    plain = [t for e in Engine(model, spec).run(PROMPT) for t in e.tokens]
    ours, lengths = run(model, TRAINED)
    assert ours == plain
    assert len(set(lengths)) > 1 and max(lengths) <= 6  # it stops at different lengths, never past max_k
    strict, _ = run(model, {**TRAINED, "threshold": 0.01})
    loose, loose_lengths = run(model, {**TRAINED, "threshold": 0.99})
    assert strict == loose == plain
    assert sum(run(model, {**TRAINED, "threshold": 0.01})[1]) < sum(loose_lengths)
    _, standin = run(model, {"drafter": DRAFTER, "max_k": 6})
    assert standin != lengths  # the stand-in (the draft's own confidence) decides differently


def test_sampled_output_follows_the_target(model, report):
    exact = exact_marginals(model)
    bound = tv_bound(TRIALS, 2 * 4)
    ours, accepted = sampled(model, "adaptive", TRIALS, params=TRAINED)
    assert accepted > TRIALS // 10
    assert tv(ours, exact).max() < bound, tv(ours, exact)


def test_without_a_head_the_error_says_how_to_train_one(model, report):
    with pytest.raises(SpecError, match="workbench train specdec --drafter draft_model:layers=1"):
        run(model, {**TRAINED, "drafter": "draft_model:layers=1"})
    with pytest.raises(SpecError, match="head=trained applies to policy=specdec"):
        RunSpec.parse("decode=adaptive:policy=heuristic,head=trained").validated()


def test_the_command_trains_and_saves_what_adaptive_loads(tmp_path, capsys):
    from workbench.cli import main

    out = tmp_path / "report.json"
    assert main(["train", "specdec", "--model", "random:llama", "--dtype", "float32", "--drafter",
                 "draft_model:layers=1", "--minutes", "0.1", "--prompts", "4", "--new-tokens", "8", "--max-steps",
                 "5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "AUC" in printed and "--decode adaptive:drafter=draft_model%3Alayers%3D1,head=trained" in printed
    assert json.loads(out.read_text())["steps"] == 5
    assert main(["generate", "5 6 7 8", "--model", "random:llama", "--dtype", "float32", "--decode",
                 "adaptive:drafter=draft_model%3Alayers%3D1,head=trained", "--max-new-tokens", "8", "--no-store"]) == 0
    assert main(["train", "specdec", "--model", "random:llama", "--drafter", "prompt_lookup"]) == 2
    assert "wrap draft_model" in capsys.readouterr().err
