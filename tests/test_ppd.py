"""PPD: prompt tokens trained on the tiny model's own outputs, then decoding with them riding in each forward.

The registry-wide matrices skip drafters that need a trained checkpoint; this file trains one in seconds and
runs the same checks (greedy identical to plain decoding, sampled output within the harness's bound).
"""

from __future__ import annotations

import json

import pytest
import torch

from workbench.decoding.base import ROOT
from workbench.decoding.ppd import tree_shape
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec
from workbench.testing import PROMPT, exact_marginals, sampled, tiny_model, tv, tv_bound
from workbench.training.distill import Sequence
from workbench.training.ppd import prompt_batch, train_ppd

from .helpers import assert_output_is_plain_decodings

pytestmark = pytest.mark.usefixtures("throwaway_checkpoints", "one_thread")

TRIALS = 500
PARAMS = {"tokens": 3, "nodes": 8, "prompted": 2}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def report(model, throwaway_checkpoints, module_one_thread):
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, (6,), generator=generator).tolist() for _ in range(24)]
    return train_ppd(model, prompts, 3, minutes=3, new_tokens=16, max_steps=60, lr=3e-2, progress=False)


def run(model, params, name="ppd", **spec):
    spec = RunSpec(max_new_tokens=24, decode=TechniqueSpec(name, params), **spec).validated()
    events = list(Engine(model, spec).run(PROMPT))
    return [t for e in events for t in e.tokens], events


def test_training_lowers_the_loss_and_the_prompt_tokens_beat_chance(report):
    assert report["steps"] == 60
    assert report["curve"][-1][2] < 0.9 * report["curve"][0][2]
    assert list(report["state_dict"]) == ["embeds"]  # the prompt tokens' embeddings are all that is trained
    assert report["state_dict"]["embeds"].shape == (3, 64)
    assert len(report["acceptance"]) == 3 and all(0 <= a <= 1 for row in report["acceptance"] for a in row)
    assert report["acceptance"][0][0] > 1.5 / 8  # the first prompt token's top guess; chance is 1/8


def test_a_prompt_token_sees_its_sequence_up_to_its_host_and_its_own_group():
    seq = Sequence(torch.arange(10, 16), torch.zeros(6, 4), start=2)  # hosts: 1, 2, 3 (t + 2 < 6)
    real, positions, slots, mask, labels = prompt_batch([seq], 2, 1, 8, None)
    assert real.tolist() == list(range(10, 16)) and slots.tolist() == [0, 1] * 3
    assert positions[6:].tolist() == [2, 3, 3, 4, 4, 5]  # host t's prompt tokens at t + 1, t + 2
    assert labels.tolist() == [13, 14, 14, 15, 15, -1]  # they guess t + 2, t + 3 (past the end: ignored)
    assert mask[:6, :6].equal(torch.ones(6, 6, dtype=torch.bool).tril()) and not mask[:6, 6:].any()
    assert mask[8].nonzero().flatten().tolist() == [0, 1, 2, 8]  # host 2's first: the sequence to 2, itself
    assert mask[9].nonzero().flatten().tolist() == [0, 1, 2, 8, 9]  # its second also sees the first


def test_prompt_tokens_go_where_the_accepted_path_likely_ends():
    acc = [[0.7, 0.2], [0.4, 0.1]]
    shape = tree_shape(acc, 3, 1)
    assert shape.paths == [(0,), (1,), (0, 0)]  # reach 0.7, 0.2, 0.28 (then (1, 0) 0.08, (0, 1) 0.07)
    assert shape.parents == [ROOT, ROOT, 0]
    # ends there: root 0.1, (0,) 0.7 - 0.28 = 0.42, (1,) 0.2, (0, 0) 0.28
    assert shape.prompted == [ROOT, 0] and shape.width == 2
    assert tree_shape(acc, 3, 2).prompted == [ROOT, 0, 2]


def test_greedy_output_is_plain_decodings_in_fewer_forwards(model, report):
    plain, plain_events = run(model, {}, name="plain")
    for params in [PARAMS, {}, {"prompted": 0, "nodes": 2}]:
        ours, events = run(model, params)
        assert ours == plain, params
        assert len(events) < len(plain_events), params
        assert max(len(e.tree.tokens) for e in events if e.tree) == params.get("nodes", 6)


def test_sampled_output_follows_the_target(model, report):
    exact = exact_marginals(model)
    bound = tv_bound(TRIALS, 2 * 4)
    ours, accepted = sampled(model, "ppd", TRIALS, params=PARAMS)
    assert accepted > TRIALS // 10
    assert tv(ours, exact).max() < bound, tv(ours, exact)
    wrong, _ = sampled(model, "ppd", TRIALS, wrong=True, params=PARAMS)
    assert tv(wrong, exact).max() > bound, tv(wrong, exact)


def test_without_a_checkpoint_the_error_says_how_to_train_one(model, report):
    with pytest.raises(SpecError, match="workbench train ppd --tokens 2"):
        run(model, {"tokens": 2})  # trained with 3 prompt tokens only
    with pytest.raises(SpecError, match="at most 64 fit"):
        RunSpec.parse("decode=ppd:nodes=40,prompted=8").validated()


def test_the_command_trains_and_saves_what_the_drafter_loads(tmp_path, capsys):
    from workbench.cli import main

    out = tmp_path / "report.json"
    assert main(["train", "ppd", "--model", "random:llama", "--dtype", "float32", "--tokens", "2", "--minutes", "0.1",
                 "--prompts", "4", "--new-tokens", "8", "--max-steps", "5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out top-1 acceptance: token 1:" in printed and "--decode ppd:tokens=2" in printed
    assert json.loads(out.read_text())["steps"] == 5
    assert main(["generate", "5 6 7 8", "--model", "random:llama", "--dtype", "float32", "--decode",
                 "ppd:tokens=2", "--max-new-tokens", "8", "--no-store"]) == 0


@pytest.mark.integration
def test_embedded_float32_output_is_plain_decodings():
    """The real model in float32 with prompt tokens trained briefly on it: token for token plain decoding's output."""
    from workbench import Workbench
    from workbench.training.heads import training_prompt_ids

    wb = Workbench(dtype="float32")
    loaded = wb.model(wb.default)
    train_ppd(loaded.model, training_prompt_ids(loaded, 3), 3, minutes=0.5, new_tokens=12, max_steps=2,
              progress=False)
    assert_output_is_plain_decodings(wb, "ppd:nodes=8,prompted=2")
