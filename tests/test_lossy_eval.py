"""`workbench eval --lossy`: lossy techniques found in the registry, measured against plain decoding in one run."""

import json
from dataclasses import dataclass

import pytest
import torch

from workbench.cli import main
from workbench.decoding.base import Acceptance, Acceptor, DraftTree
from workbench.eval.lossy import LossyOptions, agreement, contenders, evaluate_lossy, lossy_techniques
from workbench.registry import register

from . import helpers  # noqa: F401  (registers the drafter that breaks at step 3)


@register("acceptance", "_test_second_best", lossless=False)
@dataclass
class SecondBest(Acceptor):
    """A deliberately lossy acceptor: every token is the target's second choice."""

    default_drafter = "plain"

    def accept(self, tree: DraftTree, logits: torch.Tensor, probs: torch.Tensor, sampler) -> Acceptance:
        return Acceptance([], int(probs[0].topk(2).indices[1]))


TINY = dict(model="random:llama", dtype="float32", lossless=[], categories=["qa", "code_tests"], per_category=1,
            code_tasks=1, max_new_tokens=6, code_new_tokens=6)


def test_agreement_counts_the_prefix_and_every_position():
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, 1.0, None)
    assert agreement([1, 2, 9, 4], [1, 2, 3, 4]) == (0.5, 0.75, 2)  # positions agree again after the difference
    assert agreement([1, 2], [1, 2, 3, 4]) == (0.5, 0.5, 2)  # stopped early: the rest counts as different
    assert agreement([1, 2, 3, 4, 5], [1, 2, 3, 4]) == (1.0, 0.8, 4)


def test_every_lossy_decoding_technique_is_a_contender():
    planned, not_run = contenders(LossyOptions())
    names = {n for c in planned for n in c.covers} | {n["technique"] for n in not_run}
    lossy = {t.name for t in lossy_techniques() if not t.name.startswith("_")}
    assert lossy <= names and {"typical", "lexical_unit", "entropy_adaptive"} <= lossy
    assert [c.label for c in planned[:3]] == ["plain", "prompt_lookup", "token_recycling"]
    assert not any(t.category in ("cache", "compression") for t in lossy_techniques())
    by_label = {c.label: c.spec for c in planned}
    assert by_label["lexical_unit"] == "decode=draft_model;accept=lexical_unit"  # an acceptor gets a drafter
    assert by_label["entropy_adaptive"] == "decode=entropy_adaptive"
    assert "_test_second_best" not in names  # test stand-ins run only when named


def test_a_lossy_technique_is_measured_against_plain_decoding():
    result = evaluate_lossy(LossyOptions(techniques=["_test_second_best"], **TINY), progress=False)
    rows = {(r["category"], r["engine"]): r for r in result["rows"]}
    assert set(rows) == {(c, e) for c in ("qa", "code_tests", "all") for e in ("plain", "_test_second_best")}
    plain, lossy = rows[("all", "plain")], rows[("all", "_test_second_best")]
    assert plain["speed_up"] == plain["decode_speed_up"] == 1.0 and plain["departure_rate"] == 0
    assert plain["agreement_prefix"] == 1.0
    assert plain["lossless_in_run"] and not lossy["lossless_in_run"]
    assert lossy["departure_rate"] == 1.0 and lossy["agreement_prefix"] == 0.0  # second choice at every token
    assert lossy["perplexity_ratio"] > 1.0 and lossy["speed_up"] > 0
    assert rows[("code_tests", "plain")]["tests_passed"] == 0.0 and rows[("qa", "plain")]["tests_passed"] is None
    assert all(r["parses"] is not None for r in result["runs"] if r["category"] == "code_tests")
    assert len(result["runs"]) == 4 and result["not_run"] == []


def test_a_technique_that_cannot_run_is_listed_with_its_reason():
    options = LossyOptions(techniques=[], extra=["decode=draft_model:layers=2;accept=lexical_unit"],
                           **{**TINY, "categories": ["qa"]})
    options.extra += ["decode=draft_model:draft=no-such-model", "decode=_test_breaks_at_step_3"]
    result = evaluate_lossy(options, progress=False)
    assert [n["technique"] for n in result["not_run"]] == ["decode=draft_model:draft=no-such-model",
                                                          "decode=_test_breaks_at_step_3"]
    assert "no-such-model" in result["not_run"][0]["reason"]
    assert result["not_run"][1]["reason"] == "failed: RuntimeError: drafter broke"  # a bug is reported, not hidden
    assert {r["engine"] for r in result["rows"]} == {"plain", "decode=draft_model:layers=2;accept=lexical_unit"}


def test_cli_writes_results_table_and_plot(tmp_path, capsys):
    out = tmp_path / "lossy.json"
    code = main(["eval", "--lossy", "--model", "random:llama", "--dtype", "float32", "--techniques",
                 "_test_second_best", "--lossless-drafters", "prompt_lookup", "--categories", "code_tests",
                 "--code-tasks", "1", "--code-new-tokens", "4", "--out", str(out)])
    table = capsys.readouterr().out
    assert code == 0 and "| `_test_second_best` |" in table and "| `prompt_lookup` |" in table
    result = json.loads(out.read_text())
    assert {r["engine"] for r in result["rows"]} == {"plain", "prompt_lookup", "_test_second_best"}
    assert out.with_suffix(".md").read_text() == table.rstrip("\n") + "\n"
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--lossy", "--cache", "h2o"], "--cache belongs to the cache and weight evaluation"),
    (["--per-category", "2"], "--per-category applies to `workbench eval --lossy` only"),
    (["--lossy", "--techniques", "nope"], "not a lossy decoding technique: nope; valid:"),
    (["--lossy", "--categories", "poetry"], "unknown categories ['poetry']"),
    (["--lossy", "--per-category", "0"], "--per-category must be >= 1"),
])
def test_cli_refuses_bad_options_in_one_line(capsys, args, message):
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err

