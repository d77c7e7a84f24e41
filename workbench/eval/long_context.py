"""The long-context suite: passkey retrieval, key-value retrieval and summarization at about 2k, 4k and 7k tokens.

Built only from text that ships with the project or with Python, and deterministic from a seed:

- passkey (Landmark Attention, arXiv 2305.16300) and key-value retrieval (Lost in the Middle, arXiv
  2307.03172): the prompts of `workbench.eval.retrieval`, with the needle's depth and the key drawn from the
  seed; right when the expected string appears in the answer (`retrieval.is_correct`).
- summarization: consecutive pages of Python's reference manual (`pydoc_data.topics`, the evaluation text of
  `workbench.text`), starting at a page drawn from the seed and cut to the length, then an instruction to
  summarize. There is no reference summary; the score is topic coverage, the fraction of the included pages
  whose subject (the quoted word of its title, e.g. "assert", or a long word of the title) the summary names. That
  is a crude recall measure, good for comparing a technique against plain decoding on the same prompt, not
  a quality judgement.

A prompt's length is measured by `count` (the model's tokenizer: `token_counter`) and is at most the asked
length, as close to it as whole filler units allow. The embedded model's window is 8192 tokens, so the
default lengths (2048, 4096, 7168) leave room for the answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from workbench.errors import PromptError
from workbench.eval import retrieval

TASKS: tuple[str, ...] = ("passkey", "kv", "summarization")
LENGTHS: tuple[int, ...] = (2048, 4096, 7168)
SUMMARY_INSTRUCTION = "\n\nSummarize the documentation above in a few sentences, naming the topics it covers.\n\n"
SUMMARY_NEW_TOKENS = 64
NEW_TOKENS = {"passkey": retrieval.PASSKEY_NEW_TOKENS, "kv": retrieval.KV_NEW_TOKENS,
              "summarization": SUMMARY_NEW_TOKENS}


@dataclass(frozen=True)
class LongPrompt:
    """One prompt of the suite and how to score an answer to it."""

    id: str  # "<task>-<length>-<index>", unique within a suite
    task: str  # one of TASKS
    length: int  # the asked length in tokens; the prompt holds at most this many
    prompt: str
    expected: str | None  # the retrieval answer; None for summarization
    depth: float  # where the needle sits (fraction of the context before it); 0.0 for summarization
    topics: tuple[str, ...] = ()  # summarization: the subjects of the pages included

    @property
    def new_tokens(self) -> int:
        """How many tokens an answer needs (the retrieval answers are short; a summary gets 64)."""
        return NEW_TOKENS[self.task]


def _topics() -> list[tuple[str, str]]:
    """(subject, page) of every reference-manual page, in sorted key order (the order of evaluation_text)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        page = topics[key].strip()
        title = page.splitlines()[0] if page else key
        quoted = re.search(r'"([^"]+)"', title)
        out.append(((quoted.group(1) if quoted else title).strip(), page))
    return out


def summarization_prompt(n_tokens: int, start: int, count: Callable[[str], int]) -> tuple[str, tuple[str, ...]]:
    """Pages from `start` on (wrapping round), as many as fit in `n_tokens` with the instruction; the last one
    cut at a line boundary. Returns the prompt and the subjects of the pages it includes (whole or cut)."""
    pages = _topics()
    fixed = count(SUMMARY_INSTRUCTION)
    if fixed >= n_tokens:
        raise PromptError(f"a summarization prompt needs more than {fixed} tokens; asked for {n_tokens}")
    body: list[str] = []
    subjects: list[str] = []
    for i in range(len(pages)):
        subject, page = pages[(start + i) % len(pages)]
        if count("\n\n".join([*body, page]) + SUMMARY_INSTRUCTION) <= n_tokens:
            body.append(page)
            subjects.append(subject)
            continue
        lines = page.splitlines()
        lo, hi = 0, len(lines)  # the most lines of this page that still fit: binary search
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count("\n\n".join([*body, "\n".join(lines[:mid])]) + SUMMARY_INSTRUCTION) <= n_tokens:
                lo = mid
            else:
                hi = mid - 1
        if lo:
            body.append("\n".join(lines[:lo]))
            subjects.append(subject)
        break
    return "\n\n".join(body) + SUMMARY_INSTRUCTION, tuple(subjects)


def long_prompt(task: str, n_tokens: int, index: int, seed: int, count: Callable[[str], int]) -> LongPrompt:
    """Prompt `index` of `task` at `n_tokens`; its needle depth, key or starting page come from
    (seed, task, length, index), so the same arguments always give the same prompt."""
    if task not in TASKS:
        raise PromptError(f"unknown long-context task {task!r}; valid tasks: {', '.join(TASKS)}")
    rng = random.Random(f"{seed}-{task}-{n_tokens}-{index}")
    ident = f"{task}-{n_tokens}-{index}"
    if task == "summarization":
        prompt, subjects = summarization_prompt(n_tokens, rng.randrange(len(_topics())), count)
        return LongPrompt(ident, task, n_tokens, prompt, None, 0.0, subjects)
    depth = round(rng.uniform(0.05, 0.95), 2)
    if task == "passkey":
        probe = retrieval.passkey_probe(n_tokens, depth, rng.randrange(10000, 100000), count)
    else:
        probe = retrieval.kv_probe(n_tokens, depth, rng.randrange(2**31), count)
    return LongPrompt(ident, task, n_tokens, probe.prompt, probe.expected, round(probe.depth, 4))


def long_context_suite(count: Callable[[str], int], lengths: Iterable[int] = LENGTHS,
                       tasks: Iterable[str] = TASKS, per_cell: int = 1, seed: int = 0) -> list[LongPrompt]:
    """`per_cell` prompts for every (task, length), tasks outer, lengths inner."""
    if per_cell < 1:
        raise PromptError(f"per_cell must be at least 1, got {per_cell}")
    return [long_prompt(task, n, i, seed, count) for task in tasks for n in lengths for i in range(per_cell)]


def token_counter(loaded: Any) -> Callable[[str], int]:
    """`count(text)`: how many tokens the model reads `text` as (its tokenizer, or UTF-8 bytes without one)."""
    from workbench.eval.quality import encode

    return lambda text: len(encode(loaded, text))


def score(item: LongPrompt, answer: str) -> float:
    """1.0 / 0.0 for a retrieval answer (the expected string appears in it); for a summary, the fraction of
    the included pages' subjects it names (case-insensitive; `_names`)."""
    if item.expected is not None:
        return float(retrieval.is_correct(answer, item.expected))
    if not item.topics:
        return 0.0
    lowered = answer.lower()
    return sum(_names(subject, lowered) for subject in item.topics) / len(item.topics)


def _names(subject: str, text: str) -> bool:
    """Whether lowercased `text` names `subject`: the subject itself, or any word of five letters or more of a
    descriptive title ("Identifiers (Names)" is named by "identifiers" or "names")."""
    words = re.findall(r"[a-z]{5,}", subject.lower())
    return subject.lower() in text or any(w in text for w in words)


def summarize_scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean score per task and per (task, length) from rows {task, length, score}: retrieval accuracy for
    passkey and kv, topic coverage for summarization."""
    out: dict[str, Any] = {}
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        lengths = sorted({r["length"] for r in mine})
        out[task] = {"mean": sum(r["score"] for r in mine) / len(mine),
                     "by_length": {str(n): (sum(r["score"] for r in mine if r["length"] == n)
                                            / sum(1 for r in mine if r["length"] == n)) for n in lengths}}
    return out
