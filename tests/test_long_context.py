"""The long-context suite: lengths, determinism, needles in place, and the scorers."""

from __future__ import annotations

import pytest

from workbench.errors import PromptError
from workbench.eval.long_context import TASKS, long_context_suite, long_prompt, score, summarize_scores


def count(text: str) -> int:
    """Byte-level token count, as a model without a tokenizer reads text."""
    return len(text.encode())


def test_suite_lengths_tasks_and_determinism():
    suite = long_context_suite(count, lengths=(1024, 2048), per_cell=2, seed=3)
    assert [p.task for p in suite] == [t for t in TASKS for _ in range(4)]
    assert len({p.id for p in suite}) == len(suite)
    for p in suite:
        assert p.length - 200 < count(p.prompt) <= p.length, (p.id, count(p.prompt))
        if p.expected is not None:
            assert p.expected in p.prompt and 0.0 <= p.depth <= 1.0
        else:
            assert p.topics and p.prompt.rstrip().endswith("naming the topics it covers.")
    again = long_context_suite(count, lengths=(1024, 2048), per_cell=2, seed=3)
    assert [p.prompt for p in again] == [p.prompt for p in suite]
    other = long_context_suite(count, lengths=(1024, 2048), per_cell=2, seed=4)
    assert [p.prompt for p in other] != [p.prompt for p in suite]
    # the two prompts of one cell differ
    assert suite[0].prompt != suite[1].prompt


def test_scorers():
    passkey = long_prompt("passkey", 1024, 0, 0, count)
    assert score(passkey, f" {passkey.expected}.") == 1.0
    assert score(passkey, f" 1{passkey.expected}") == 0.0  # part of a longer number is wrong
    kv = long_prompt("kv", 1024, 0, 0, count)
    assert score(kv, kv.expected + '"') == 1.0 and score(kv, "00000000") == 0.0
    summary = long_prompt("summarization", 2048, 0, 0, count)
    assert score(summary, "") == 0.0
    assert score(summary, " ".join(summary.topics)) == 1.0
    assert 0.0 < score(summary, summary.topics[0]) <= 1.0
    rows = [{"task": "kv", "length": 1024, "score": 1.0}, {"task": "kv", "length": 1024, "score": 0.0},
            {"task": "kv", "length": 2048, "score": 1.0}]
    assert summarize_scores(rows) == {"kv": {"mean": 2 / 3, "by_length": {"1024": 0.5, "2048": 1.0}}}


def test_bad_input():
    with pytest.raises(PromptError, match="valid tasks"):
        long_prompt("essay", 1024, 0, 0, count)
    with pytest.raises(PromptError, match="at least"):
        long_prompt("passkey", 20, 0, 0, count)
    with pytest.raises(PromptError, match="per_cell"):
        long_context_suite(count, per_cell=0)
