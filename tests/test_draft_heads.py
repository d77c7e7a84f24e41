"""Trained draft heads (medusa, hydra, falcon): the training pipeline, the candidate tree, and losslessness.

The registry-wide matrices (test_lossless, test_distribution, test_cache_matrix) skip drafters that need a
trained checkpoint; this file trains one per model in seconds and runs the same checks on it.
"""

from __future__ import annotations

import json

import pytest
import torch

from workbench import registry
from workbench.decoding.draft_heads import tree_paths
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec
from workbench.testing import PROMPT, exact_marginals, sampled, tiny_model, tv, tv_bound
from workbench.training.corpus import KINDS as PROMPT_KINDS
from workbench.training.corpus import overlaps_suite, training_prompts
from workbench.training.heads import train_heads

from .helpers import assert_output_is_plain_decodings

pytestmark = pytest.mark.usefixtures("throwaway_checkpoints", "one_thread")

KINDS = ["medusa", "hydra", "falcon"]
SETTINGS = {"heads": 3}
PARAMS = {"heads": 3, "nodes": 8}
TRIALS = 800


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reports(model, throwaway_checkpoints, module_one_thread):
    """Every kind trained on the tiny model's own continuations of random prompts."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, (6,), generator=generator).tolist() for _ in range(24)]
    return {kind: train_heads(registry.get("decoding", kind).cls, model, prompts, SETTINGS, minutes=3,
                              new_tokens=16, max_steps=200, progress=False) for kind in KINDS}


def run(model, name, params, **spec):
    spec = RunSpec(max_new_tokens=24, decode=TechniqueSpec(name, params), **spec).validated()
    events = list(Engine(model, spec).run(PROMPT))
    return [t for e in events for t in e.tokens], len(events)


def test_the_tree_holds_the_most_likely_paths_parents_first():
    acc = [[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.4, 0.1, 0.1]]
    paths = tree_paths(acc, 5)
    assert paths == [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]  # 0.6, 0.2, 0.3, 0.12, 0.12
    assert all(len(p) == 1 or p[:-1] in paths[:paths.index(p)] for p in paths)
    assert len(tree_paths(acc, 100)) == 3 + 9 + 27  # every path, when the budget allows


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_loss_and_the_heads_beat_chance(reports, kind):
    report = reports[kind]
    assert report["curve"][-1][2] < 0.75 * report["curve"][0][2]
    top1 = [row[0] for row in report["acceptance"]]
    assert top1[0] > 2 / 8  # chance is 1/8 on this 8-token model
    assert all(0 <= a <= 1 for row in report["acceptance"] for a in row)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_output_is_plain_decodings_in_fewer_forwards(model, reports, kind):
    plain, plain_steps = run(model, "plain", {})
    ours, steps = run(model, kind, PARAMS)
    assert ours == plain
    assert steps < plain_steps


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_output_follows_the_target(model, reports, kind):
    exact = exact_marginals(model)
    bound = tv_bound(TRIALS, 2 * len(KINDS) * 4)
    ours, accepted = sampled(model, kind, TRIALS, params=PARAMS)
    assert accepted > TRIALS // 10
    assert tv(ours, exact).max() < bound, tv(ours, exact)
    wrong, _ = sampled(model, kind, TRIALS, wrong=True, params=PARAMS)
    assert tv(wrong, exact).max() > bound, tv(wrong, exact)


@pytest.mark.parametrize("kind", KINDS)
def test_a_draft_vocabulary_guesses_only_its_tokens_and_keeps_the_output(model, reports, kind):
    counts = reports[kind]["token_counts"]
    assert counts.sum() > 0 and len(counts) == model.config.vocab_size
    allowed = set(counts.float().topk(4).indices.tolist())  # the 4 tokens the target produced most in training
    params = {"heads": 3, "nodes": 3, "vocab": 4}  # a small tree: its guesses fit in 4 of the 8 tokens
    spec = RunSpec(max_new_tokens=24, decode=TechniqueSpec(kind, params)).validated()
    events = list(Engine(model, spec).run(PROMPT))
    drafted = {t for e in events if e.tree for t in e.tree.tokens}
    assert drafted and drafted <= allowed
    assert [t for e in events for t in e.tokens] == run(model, "plain", {})[0]


def test_a_checkpoint_without_token_counts_says_how_to_get_a_draft_vocabulary(model, reports, monkeypatch):
    from workbench.decoding import draft_heads

    original = draft_heads.load_checkpoint

    def without_counts(path):
        payload = original(path)
        return payload and {k: v for k, v in payload.items() if k != "token_counts"}

    monkeypatch.setattr(draft_heads, "load_checkpoint", without_counts)
    with pytest.raises(SpecError, match="train it again with `workbench train hydra`, or run hydra:vocab=0"):
        run(model, "hydra", {"heads": 3, "nodes": 3, "vocab": 4})
    assert run(model, "hydra", {**PARAMS, "vocab": 0})[0] == run(model, "plain", {})[0]
    monkeypatch.undo()
    with pytest.raises(SpecError, match="is smaller than the"):  # the tree needs more guesses than 2 tokens
        run(model, "hydra", {**PARAMS, "vocab": 2})


@pytest.mark.parametrize("kind", KINDS)
def test_without_a_checkpoint_the_error_says_how_to_train_one(model, reports, kind):
    with pytest.raises(SpecError, match=f"workbench train {kind}"):
        run(model, kind, {"heads": 2})  # trained with 3 heads only


def test_falcon_glancing_shows_the_target_in_proportion_to_the_wrong_guesses():
    from workbench.decoding.falcon import glanced

    truth = torch.tensor([[5, 6], [5, 6], [5, 6], [5, -1]])
    guess = torch.tensor([[5, 6], [5, 0], [0, 0], [0, 3]])
    out = glanced(guess, truth, torch.Generator().manual_seed(0))
    assert out[0].tolist() == [5, 6]  # all right: nothing shown
    assert out[1, 0] == 5 and out[1, 1] in (0, 6)  # one wrong: ceil(0.5) = 1 slot shown, either of the two
    assert sorted((out[2] == truth[2]).tolist()) == [False, True]  # two wrong: one shown, one left as guessed
    assert out[3, 0] in (0, 5) and out[3, 1] == 0  # past the end: the padding, never the guess
    many = glanced(torch.zeros(4000, 2, dtype=torch.long), torch.ones(4000, 2, dtype=torch.long), None)
    assert (many == 1).sum(1).eq(1).all()  # always exactly one of two wrong guesses shown


def test_training_prompts_never_come_from_the_benchmark_suite():
    prompts = training_prompts(160)
    assert len(prompts) == 160 and len(set(prompts)) == 160
    assert prompts == training_prompts(160)  # deterministic for a seed
    assert prompts != training_prompts(160, seed=1)
    assert overlaps_suite(prompts) == []
    assert {p.kind for p in prompts} == set(PROMPT_KINDS)  # the suite's kinds of task, in equal shares
    chats = [p for p in prompts if p.kind == "multi_turn"]
    assert all([role for role, _ in p.messages] == ["user", "assistant", "user"] for p in chats)
    assert all(p.messages[1][1] is None for p in chats)  # the target's own reply, filled in when distilling
    assert all(p.messages[-1][0] == "user" and p.messages[-1][1] for p in prompts)
    from workbench.eval.suite import suite

    leaked = suite()[0].prompt
    leaked = leaked if isinstance(leaked, str) else leaked[0]["content"]
    assert overlaps_suite([leaked]) == [leaked]  # the check itself sees a suite prompt


def test_the_command_trains_and_saves_what_the_drafter_loads(tmp_path, capsys):
    from workbench.cli import main

    out = tmp_path / "report.json"
    assert main(["train", "medusa", "--model", "random:llama", "--dtype", "float32", "--heads", "2", "--minutes",
                 "0.1", "--prompts", "4", "--new-tokens", "8", "--max-steps", "20", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out top-1 acceptance: head 1:" in printed and "--decode medusa:heads=2" in printed
    report = json.loads(out.read_text())
    assert report["steps"] == 20 and len(report["acceptance"]) == 2
    assert set(report["vocab_coverage"]) == {"2048", "4096", "8192", "16384"}  # the tiny vocabulary: all inside
    assert all(share == 1.0 for share in report["vocab_coverage"].values())
    assert main(["generate", "5 6 7 8", "--model", "random:llama", "--dtype", "float32", "--decode",
                 "medusa:heads=2", "--max-new-tokens", "8", "--no-store"]) == 0
    assert main(["train", "medusa", "--model", "random:llama", "--heads", "9"]) == 2
    assert "--heads 9 is out of range" in capsys.readouterr().err


@pytest.fixture(scope="module")
def embedded():
    from workbench import Workbench

    return Workbench(dtype="float32")


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_embedded_float32_output_is_plain_decodings(embedded, kind):
    """The real model in float32 with heads trained briefly on it: token for token plain decoding's output."""
    from workbench.training.heads import training_prompt_ids

    wb = embedded
    loaded = wb.model(wb.default)
    train_heads(registry.get("decoding", kind).cls, loaded.model, training_prompt_ids(loaded, 3), SETTINGS,
                minutes=0.5, new_tokens=12, max_steps=20, progress=False)
    assert_output_is_plain_decodings(wb, f"{kind}:heads=3,nodes=8")


def test_a_model_has_one_fingerprint_in_float32_and_bfloat16():
    """A checkpoint trained on the model in one dtype is found for the same model in the other."""
    from workbench.models import load_model
    from workbench.training.checkpoints import model_fingerprint

    full = load_model("random:llama", "float32", "cpu").model
    half = load_model("random:llama", "bfloat16", "cpu").model
    assert full.embed.weight.dtype == torch.float32 and half.embed.weight.dtype == torch.bfloat16
    assert not torch.equal(full.embed.weight, half.embed.weight.float())  # the values do differ
    assert model_fingerprint(full) == model_fingerprint(half)
    other = load_model("random:llama", "float32", "cpu").model
    with torch.no_grad():
        other.embed.weight[0, 0] += 1.0
    assert model_fingerprint(other) != model_fingerprint(full)
