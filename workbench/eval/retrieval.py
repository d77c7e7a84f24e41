"""Synthetic retrieval through the cache: passkey and key-value retrieval.

Passkey (the synthetic task of Landmark Attention, arXiv 2305.16300): a five-digit number is stated once,
at depth d, inside n tokens of repeated filler sentences; the prompt ends by asking for it. Key-value
retrieval (the synthetic task of Lost in the Middle, arXiv 2307.03172): a JSON object of random hex keys
and values, then one key; the answer is its value, and the asked pair sits at depth d of the object.
The prompts are plain text (no chat template) ending where the answer starts, so a small model can
complete them. Each prompt is generated greedily through `Workbench.generate` with the run's cache
policies and weight transforms and plain decoding; an answer is right when the expected string appears
in it. The engine compresses the whole prompt, question included, after the prefill; the prefill's own
last row (with the full cache) picks the first answer token, and every later token reads the compressed
cache.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workbench.errors import PromptError

PASSKEY_INTRO = ("There is a pass key hidden in the long text below. Read the text, find the pass key and "
                 "remember it: you will be asked for it at the end.\n\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
KV_INTRO = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"
HEX = "0123456789abcdef"

# New tokens generated per answer: five digits (one token each in SmolLM2's tokenizer) or eight hex
# characters, with room for a leading space, quotes and, for byte-level test models, multi-byte characters.
PASSKEY_NEW_TOKENS = 10
KV_NEW_TOKENS = 20


@dataclass
class Probe:
    """One retrieval prompt and what a right answer contains."""

    prompt: str
    expected: str
    depth: float  # where the needle really sits: the fraction of the filler (or of the pairs) before it


def passkey_probe(n_tokens: int, depth: float, key: int, count: Callable[[str], int]) -> Probe:
    """A passkey prompt of at most `n_tokens` tokens (as `count` measures them; as close to it as whole
    filler units allow) with the key after the filler unit nearest to `depth` of the way through."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "

    def build(units: int) -> tuple[str, int]:
        before = round(depth * units)
        return (PASSKEY_INTRO + PASSKEY_FILLER * before + needle + PASSKEY_FILLER * (units - before)
                + PASSKEY_QUESTION), before

    units = _fit(lambda u: build(u)[0], n_tokens, count, PASSKEY_FILLER, "passkey")
    prompt, before = build(units)
    return Probe(prompt, str(key), before / units if units else 0.0)


def kv_probe(n_tokens: int, depth: float, seed: int, count: Callable[[str], int]) -> Probe:
    """A key-value retrieval prompt of at most `n_tokens` tokens; the asked pair at `depth` of the object."""
    rng = random.Random(seed)
    keys = list(dict.fromkeys("".join(rng.choices(HEX, k=8)) for _ in range(4 * n_tokens)))  # unique keys
    pairs = [(k, "".join(rng.choices(HEX, k=8))) for k in keys]

    def build(n_pairs: int) -> tuple[str, int]:
        asked = round(depth * (n_pairs - 1))
        body = ",\n ".join(f'"{k}": "{v}"' for k, v in pairs[:n_pairs])
        return f'{KV_INTRO}{body}}}\n\nKey: "{pairs[asked][0]}"\nCorresponding value: "', asked

    n_pairs = _fit(lambda u: build(u + 1)[0], n_tokens, count, '"0123abcd": "4567ef89",\n ', "key-value") + 1
    prompt, asked = build(n_pairs)
    return Probe(prompt, pairs[asked][1], asked / (n_pairs - 1) if n_pairs > 1 else 0.0)


def _fit(build: Callable[[int], str], n_tokens: int, count: Callable[[str], int], unit: str, task: str) -> int:
    """The most units u with count(build(u)) <= n_tokens: a guess from the unit's token count, then steps."""
    fixed = count(build(0))
    if fixed > n_tokens:
        raise PromptError(f"a {task} prompt needs at least {fixed} tokens; asked for {n_tokens}")
    per_unit = max(count(unit * 8) / 8, 1e-3)
    units = max(int((n_tokens - fixed) / per_unit), 0)
    while units > 0 and count(build(units)) > n_tokens:
        units -= 1
    while count(build(units + 1)) <= n_tokens:
        units += 1
    return units


def is_correct(answer: str, expected: str) -> bool:
    """Whether the expected string appears in the answer (a number not as part of a longer number)."""
    if expected.isdigit():
        return re.search(rf"(?<!\d){expected}(?!\d)", answer) is not None
    return expected in answer


def probe(task: str, n_tokens: int, depth: float, trial: int, count: Callable[[str], int]) -> Probe:
    """The probe of `task` ("passkey" or "kv") for one cell; the key and pairs come from the trial number, so
    every run sees the same prompts."""
    seed = 1000 * trial + n_tokens + round(100 * depth)
    if task == "passkey":
        return passkey_probe(n_tokens, depth, random.Random(seed).randrange(10000, 100000), count)
    return kv_probe(n_tokens, depth, seed, count)


def probes(task: str, lengths: list[int], depths: list[float], trials: int,
           count: Callable[[str], int]) -> list[tuple[dict[str, Any], Probe]]:
    """Every (length, depth, trial) cell of `task` and its probe; built once and shown to every run."""
    return [({"length": n, "depth": d, "trial": t}, probe(task, n, d, t, count))
            for n in lengths for d in depths for t in range(trials)]


def run_task(task: str, cells: list[tuple[dict[str, Any], Probe]], generate: Callable[[str, int], str]) -> dict:
    """Ask every probe; `generate(prompt, max_new_tokens)` returns the answer text."""
    new_tokens = PASSKEY_NEW_TOKENS if task == "passkey" else KV_NEW_TOKENS
    rows = []
    for cell, p in cells:
        answer = generate(p.prompt, new_tokens)
        rows.append({**cell, "needle_depth": round(p.depth, 4), "expected": p.expected, "answer": answer,
                     "correct": is_correct(answer, p.expected)})
    return summarize(rows)


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall, per length and per depth, from cells {length, depth, trial, correct, answer}."""
    def acc(rows: list[dict[str, Any]]) -> float:
        return sum(r["correct"] for r in rows) / len(rows)

    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    return {
        "accuracy": acc(cells),
        "by_length": {str(n): acc([c for c in cells if c["length"] == n]) for n in lengths},
        "by_depth": {str(d): acc([c for c in cells if c["depth"] == d]) for d in depths},
        "cells": cells,
    }
