"""Clover and Kangaroo, the trained drafters that attend over the context: training, drafting, losslessness.

The registry-wide matrices skip drafters that need a trained checkpoint; this file trains one of each per test
model in seconds and runs the same checks on them.
"""

from __future__ import annotations

import json

import pytest
import torch

from workbench import registry
from workbench.decoding.draft_attention import KeptKeys
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec
from workbench.testing import PROMPT, exact_marginals, sampled, tiny_model, tv, tv_bound
from workbench.training.heads import train_heads

from .helpers import assert_output_is_plain_decodings

pytestmark = pytest.mark.usefixtures("throwaway_checkpoints", "one_thread")

KINDS = ["clover", "kangaroo"]
SETTINGS = {"clover": {"heads": 3}, "kangaroo": {"layers": 2}}
PARAMS = {"clover": {"heads": 3, "nodes": 8}, "kangaroo": {"layers": 2, "k": 4, "threshold": 0.3}}
TRIALS = 300


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reports(model, throwaway_checkpoints, module_one_thread):
    """Both trained on the tiny model's own continuations of random prompts."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, (6,), generator=generator).tolist() for _ in range(48)]
    return {kind: train_heads(registry.get("decoding", kind).cls, model, prompts, SETTINGS[kind], minutes=0.5,
                              new_tokens=16, max_steps=100, lr=3e-3, progress=False) for kind in KINDS}


def run(model, name, params, **spec):
    spec = RunSpec(max_new_tokens=24, decode=TechniqueSpec(name, params), **spec).validated()
    events = list(Engine(model, spec).run(PROMPT))
    return [t for e in events for t in e.tokens], events


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_loss_and_the_drafts_beat_chance(reports, kind):
    report = reports[kind]
    assert report["curve"][-1][2] < 0.75 * report["curve"][0][2]
    assert len(report["acceptance"]) == (3 if kind == "clover" else 1)
    assert report["acceptance"][0][0] > 2 / 8  # chance is 1/8 on this 8-token model
    assert all(0 <= a <= 1 for row in report["acceptance"] for a in row)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_output_is_plain_decodings_in_fewer_forwards(model, reports, kind):
    plain, plain_events = run(model, "plain", {})
    ours, events = run(model, kind, PARAMS[kind])
    assert ours == plain
    assert len(events) < len(plain_events)


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_output_follows_the_target(model, reports, kind):
    exact = exact_marginals(model)
    bound = tv_bound(TRIALS, 2 * len(KINDS) * 4)
    ours, accepted = sampled(model, kind, TRIALS, params=PARAMS[kind])
    assert accepted > TRIALS // 10
    assert tv(ours, exact).max() < bound, tv(ours, exact)
    wrong, _ = sampled(model, kind, TRIALS, wrong=True, params=PARAMS[kind])
    assert tv(wrong, exact).max() > bound, tv(wrong, exact)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_output_is_plain_decodings_under_every_cache_policy(model, reports, kind):
    """Clover keeps its own keys and Kangaroo drafts on the target's cache: both compose with every policy."""
    from .test_cache_matrix import CACHE_PARAMS

    for policy in registry.techniques("cache"):
        cache = [TechniqueSpec(policy.name, CACHE_PARAMS.get(policy.name, {}))]
        plain, _ = run(model, "plain", {}, cache=cache)
        ours, _ = run(model, kind, PARAMS[kind], cache=cache)
        assert ours == plain, policy.name


@pytest.mark.parametrize("kind, other", [("clover", {"heads": 2}), ("kangaroo", {"layers": 1})])
def test_without_a_checkpoint_the_error_says_how_to_train_one(model, reports, kind, other):
    with pytest.raises(SpecError, match=f"workbench train {kind}"):
        run(model, kind, other)


def test_kangaroo_refuses_a_shallow_network_as_deep_as_the_target(model):
    with pytest.raises(SpecError, match="layers=4 must be below the model's 4 layers"):
        run(model, "kangaroo", {"layers": 4})


def test_kangaroo_stops_drafting_when_unsure(model, reports):
    """The second early exit: threshold 0 drafts k tokens whenever the budget allows, threshold 1 one per step."""
    _, sure = run(model, "kangaroo", {"layers": 2, "k": 4, "threshold": 0.0})
    _, unsure = run(model, "kangaroo", {"layers": 2, "k": 4, "threshold": 1.0})
    assert max(e.n_drafted for e in sure) == 4
    assert {e.n_drafted for e in unsure[1:]} == {1}


def test_clover_keeps_the_same_states_step_by_step_as_over_the_whole_sequence(model, reports):
    """Decoding augments the committed positions a few at a time, keeping keys; training runs the sequence at
    once. Both must give the same augmented states, or the heads would draft from states they never saw."""
    from workbench.decoding.clover import CloverHeads

    torch.manual_seed(0)
    heads = CloverHeads(64, 3).eval()
    states = torch.randn(1, 11, 64)
    with torch.no_grad():
        whole = heads.augment(states, torch.arange(11))
        kept, parts = KeptKeys(), []
        for start, end in [(0, 6), (6, 7), (7, 11)]:
            parts.append(heads.augment(states[:, start:end], torch.arange(start, end), kept))
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-5)
    kept.cut(7)
    assert len(kept) == 7


@pytest.mark.parametrize("kind", KINDS)
def test_the_command_trains_and_saves_what_the_drafter_loads(tmp_path, capsys, kind):
    from workbench.cli import main

    out = tmp_path / "report.json"
    option = ["--heads", "2"] if kind == "clover" else ["--layers", "1"]
    assert main(["train", kind, "--model", "random:llama", "--dtype", "float32", *option, "--minutes", "0.1",
                 "--prompts", "4", "--new-tokens", "8", "--max-steps", "10", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out top-1 acceptance:" in printed and f"--decode {kind}:" in printed
    report = json.loads(out.read_text())
    assert report["steps"] == 10 and len(report["curve"]) >= 1
    decode = f"{kind}:heads=2" if kind == "clover" else f"{kind}:layers=1"
    assert main(["generate", "5 6 7 8", "--model", "random:llama", "--dtype", "float32", "--decode", decode,
                 "--max-new-tokens", "8", "--no-store"]) == 0


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_embedded_float32_output_is_plain_decodings(kind):
    """The real model in float32 with a drafter trained briefly on it: token for token plain decoding's output."""
    from workbench import Workbench
    from workbench.training.heads import training_prompt_ids

    wb = Workbench(dtype="float32")
    loaded = wb.model(wb.default)
    train_heads(registry.get("decoding", kind).cls, loaded.model, training_prompt_ids(loaded, 3), SETTINGS[kind],
                minutes=0.5, new_tokens=12, max_steps=10, progress=False)
    params = ",".join(f"{k}={v}" for k, v in PARAMS[kind].items())
    assert_output_is_plain_decodings(wb, f"{kind}:{params}")
