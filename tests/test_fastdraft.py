"""FastDraft: a draft model trained on the tiny model's own outputs, then speculative decoding with it.

The registry-wide matrices skip drafters that need a trained checkpoint; this file trains one in seconds and
runs the same checks (greedy identical to plain decoding, sampled output within the harness's bound).
"""

from __future__ import annotations

import json

import pytest
import torch

from workbench.decoding.fastdraft import train_fastdraft
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec
from workbench.testing import PROMPT, exact_marginals, sampled, tiny_model, tv, tv_bound

from .helpers import assert_output_is_plain_decodings

pytestmark = pytest.mark.usefixtures("throwaway_checkpoints", "one_thread")

TRIALS = 800


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def report(model, throwaway_checkpoints, module_one_thread):
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, (6,), generator=generator).tolist() for _ in range(24)]
    return train_fastdraft(model, prompts, 2, minutes=3, new_tokens=16, max_steps=150, batch_tokens=64,
                           window=32, lr=3e-3, progress=False)


def run(model, params, name="fastdraft", **spec):
    spec = RunSpec(max_new_tokens=24, decode=TechniqueSpec(name, params), **spec).validated()
    events = list(Engine(model, spec).run(PROMPT))
    return [t for e in events for t in e.tokens], len(events)


def test_training_lowers_the_loss_and_keeps_only_the_drafts_own_weights(report):
    assert report["curve"][-1][2] < 0.75 * report["curve"][0][2]
    assert report["steps"] == 150
    assert all(0 <= a <= 1 for a in report["acceptance"][0])
    assert report["acceptance"][0][0] > 3 / 8  # held-out agreement with the target; chance is 1/8
    assert not any(k.startswith(("embed.", "lm_head.")) for k in report["state_dict"])  # the target's, shared
    assert {k.split(".")[1] for k in report["state_dict"] if k.startswith("layers.")} == {"0", "1"}


def test_greedy_output_is_plain_decodings_in_fewer_forwards(model, report):
    plain, plain_steps = run(model, {}, name="plain")
    ours, steps = run(model, {"layers": 2})
    assert ours == plain
    assert steps < plain_steps


def test_sampled_output_follows_the_target(model, report):
    exact = exact_marginals(model)
    bound = tv_bound(TRIALS, 2 * 4)
    ours, accepted = sampled(model, "fastdraft", TRIALS, params={"layers": 2})
    assert accepted > TRIALS // 10
    assert tv(ours, exact).max() < bound, tv(ours, exact)
    wrong, _ = sampled(model, "fastdraft", TRIALS, wrong=True, params={"layers": 2})
    assert tv(wrong, exact).max() > bound, tv(wrong, exact)


def test_without_a_checkpoint_the_error_says_how_to_train_one(model, report):
    with pytest.raises(SpecError, match="workbench train fastdraft --layers 1"):
        run(model, {"layers": 1})  # trained with 2 layers only
    with pytest.raises(SpecError, match="fewer than the target's 4"):
        train_fastdraft(model, [[1, 2, 3]], 4, minutes=0.1, progress=False)


def test_the_command_trains_and_saves_what_the_drafter_loads(tmp_path, capsys):
    from workbench.cli import main

    out = tmp_path / "report.json"
    assert main(["train", "fastdraft", "--model", "random:llama", "--dtype", "float32", "--layers", "1",
                 "--minutes", "0.1", "--prompts", "4", "--new-tokens", "8", "--max-steps", "5", "--json",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out top-1 agreement with the target:" in printed and "--decode fastdraft:layers=1" in printed
    assert json.loads(out.read_text())["steps"] == 5
    assert main(["generate", "5 6 7 8", "--model", "random:llama", "--dtype", "float32", "--decode",
                 "fastdraft:layers=1", "--max-new-tokens", "8", "--no-store"]) == 0


@pytest.mark.integration
def test_embedded_float32_output_is_plain_decodings():
    """The real model in float32 with a draft trained briefly on it: token for token plain decoding's output."""
    from workbench import Workbench
    from workbench.training.heads import training_prompt_ids

    wb = Workbench(dtype="float32")
    loaded = wb.model(wb.default)
    train_fastdraft(loaded.model, training_prompt_ids(loaded, 3), 2, minutes=0.5, new_tokens=12, max_steps=3,
                    batch_tokens=64, window=32, progress=False)
    assert_output_is_plain_decodings(wb, "fastdraft")
