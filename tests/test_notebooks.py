"""The teaching labs (notebooks/): stored without outputs, in step with their sources, and every solutions copy
runs top to bottom (its checks included) within a per-notebook time limit. The checks reject wrong answers
with plain words."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nbformat
import pytest
import torch

from workbench import labs

ROOT = Path(__file__).resolve().parent.parent
LABS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("[0-9][0-9]_*.ipynb"))
LIMIT_S = 240  # per notebook; each takes well under a minute on an idle 2-core machine (docs/notebooks.md)


def committed(path: Path) -> str:
    """The notebook as committed (HEAD), so a student's saved work in `make lab` fails nothing; the working
    tree's copy outside a git checkout or for a notebook not committed yet."""
    rel = path.relative_to(ROOT).as_posix()
    result = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else path.read_text()


def test_there_are_seven_labs_each_with_a_solutions_copy():
    assert len(LABS) == 7
    assert [p.name for p in SOLUTIONS] == [p.name for p in LABS]


@pytest.mark.parametrize("path", LABS + SOLUTIONS, ids=lambda p: str(p.relative_to(ROOT / "notebooks")))
def test_committed_notebooks_have_no_outputs(path):
    nb = nbformat.reads(committed(path), as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name} cell {i} was committed with outputs: clear them"
            assert cell.execution_count is None, f"{path.name} cell {i} was committed with an execution count"


def test_notebooks_are_generated_from_their_sources(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from make_notebooks import rendered

    stale = [str(p.relative_to(ROOT)) for p, text in rendered().items() if committed(p) != text]
    assert not stale, f"run python scripts/make_notebooks.py and commit: {stale}"


@pytest.mark.parametrize("path", LABS, ids=lambda p: p.name)
def test_student_copies_leave_the_exercises_to_the_student(path):
    sources = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    solved = [c.source for c in nbformat.read(ROOT / "notebooks" / "solutions" / path.name, as_version=4).cells
              if c.cell_type == "code"]
    assert any("raise NotImplementedError" in s for s in sources), "a lab needs at least one exercise"
    assert not any("NotImplementedError" in s for s in solved)
    assert not any("SOLUTION" in s for s in sources + solved)
    assert any("check_" in s for s in solved), "every lab checks its exercises"


@pytest.mark.integration
@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_solutions_run_top_to_bottom(path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from make_notebooks import execute

    nb, elapsed = execute(path, LIMIT_S)
    assert elapsed < LIMIT_S, f"{path.name} took {elapsed:.0f} s, over its {LIMIT_S} s limit"
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "\u2714" in text, "the checks printed no success line"


def test_checks_reject_wrong_answers_in_plain_words():
    wrong = {
        labs.check_verify: (lambda p, q, x, generator: x, "not distributed as the target"),
        labs.check_expected_tokens: (lambda alpha, k: alpha * k, "expected"),
        labs.check_ngram_lookup: (lambda tokens, max_ngram, k: tokens[-k:], "prompt lookup drafts"),
        labs.check_streaming_mask: (lambda context, sinks, window: torch.ones(context, dtype=torch.bool),
                                    "StreamingLLM keeps"),
        labs.check_processed_probs: (lambda logits, t, k, p: torch.softmax(logits, -1), "temperature before"),
        labs.check_quantize_keys: (lambda k, bits: labs.quantize_minmax(k, 1, bits), "per channel"),
        labs.check_int4: (lambda w, group: (torch.zeros_like(w, dtype=torch.uint8), torch.ones(16, 4),
                                            torch.zeros(16, 4)), "round-to-nearest"),
    }
    for check, (answer, words) in wrong.items():
        with pytest.raises(labs.LabCheckError, match=words):
            check(answer)


def test_check_sql_names_the_missing_group_by():
    class Trace:
        def __init__(self, name, value):
            self.spec = type("S", (), {"decode": type("D", (), {"name": name})()})()
            self.value = value

        def summary(self):
            return {"mean_accepted_length": self.value}

    traces = [Trace("plain", 1.0), Trace("prompt_lookup", 3.0), Trace("prompt_lookup", 2.0)]
    labs.check_sql([{"decode": "plain", "mean_accepted_length": 1.0},
                    {"decode": "prompt_lookup", "mean_accepted_length": 2.5}], traces)
    with pytest.raises(labs.LabCheckError, match="GROUP BY"):
        labs.check_sql([{"decode": None, "mean_accepted_length": 2.0}], traces)
    with pytest.raises(labs.LabCheckError, match="mean accepted length is 2.5"):
        labs.check_sql([{"decode": "plain", "mean_accepted_length": 1.0},
                        {"decode": "prompt_lookup", "mean_accepted_length": 3.0}], traces)


def test_a_drafter_cell_run_again_in_a_notebook_replaces_its_registration():
    """Lab 7 registers a drafter in a cell; running that cell again must not fail as a duplicate name, while a
    different class taking a registered name still does."""
    from dataclasses import make_dataclass

    from workbench import registry
    from workbench.decoding.base import Drafter

    def define():
        cls = make_dataclass("LabDrafter", [], bases=(Drafter,))
        cls.__module__ = "__main__"
        return registry.register("decoding", "_lab_test_drafter", lossless=True)(cls)

    first, second = define(), define()
    try:
        assert registry.get("decoding", "_lab_test_drafter").cls is second is not first
        with pytest.raises(ValueError, match="already registered"):
            registry.register("decoding", "prompt_lookup", lossless=True)(make_dataclass("Other", [], bases=(Drafter,)))
    finally:
        registry._registry["decoding"].pop("_lab_test_drafter", None)
