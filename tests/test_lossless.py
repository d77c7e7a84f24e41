"""Every lossless drafter in the registry: greedy output is plain decoding's, token for token, and sampled
output (verified by matching) is plain decoding's sample for the same seed. Sampled output of every drafter
follows the target's distribution: tests/test_distribution.py.

Identical means: float32 always; bfloat16 where the CPU kernels run (each verified row computed as a
one-row step would be). bfloat16 without them only agrees: identical up to a near-tie (tested below)."""

import os
import subprocess
import sys
import weakref

import pytest
import torch

from workbench import registry
from workbench.decoding.base import Drafter
from workbench.engine import Engine
from workbench.kernels import cpu as cpu_kernels
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")

LOSSLESS = [t.name for t in registry.techniques("decoding")
            if t.lossless and issubclass(t.cls, Drafter) and not t.name.startswith("_") and t.name != "plain"
            and not getattr(t.cls, "needs_training", False)]  # trained drafters: test_draft_heads.py
# Parameters that fit the tiny 4-layer test models (defaults are sized for real ones).
TEST_PARAMS = {
    "draft_model": {"layers": 2},
    "rsd": {"layers": 2},
    "dyspec": {"layers": 2},
    "longspec": {"layers": 2, "sink": 2, "window": 8},  # a view smaller than the prompts
    "adaptive": {"drafter": "draft_model:layers=2"},
}
# Prompts with repeats, so that copying drafters find something to copy.
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6],
    [100, 200, 300, 100, 200, 300, 100, 200, 300, 100],
    [int(t) for t in torch.randint(3, 500, (30,), generator=torch.Generator().manual_seed(0))],
]


def generate(model, spec):
    return [[t for e in Engine(model, spec).run(p) for t in e.tokens] for p in PROMPTS]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request):
    return varied_model(request.param)


def test_the_matrix_is_not_empty():
    assert "prompt_lookup" in LOSSLESS


@pytest.mark.parametrize("name", LOSSLESS)
def test_greedy_output_equals_plain_decoding(model, name):
    plain = generate(model, RunSpec(max_new_tokens=40))
    ours = generate(model, RunSpec(max_new_tokens=40, decode=TechniqueSpec(name, TEST_PARAMS.get(name, {}))))
    assert ours == plain


@pytest.mark.parametrize("name", [n for n in LOSSLESS if registry.get("decoding", n).cls.default_acceptor == "match"])
def test_sampled_output_equals_plain_decoding_with_the_same_seed(model, name):
    """Matching draws once per committed token, in plain decoding's order, so even the samples agree."""
    spec = dict(max_new_tokens=40, temperature=0.8, top_p=0.95, seed=11)
    plain = generate(model, RunSpec(**spec))
    ours = generate(model, RunSpec(**spec, decode=TechniqueSpec(name, TEST_PARAMS.get(name, {}))))
    assert ours == plain


EMBEDDED_PARAMS = {"draft_model": "draft_model:layers=8", "rsd": "rsd:layers=8", "dyspec": "dyspec:layers=8",
                   "adaptive": "adaptive:drafter=draft_model%3Alayers%3D8"}


@pytest.fixture(scope="module")
def embedded():
    from workbench import Workbench

    return Workbench(dtype="float32")


EMBEDDED_PROMPTS = ["Summarise in one sentence: The library opens at nine, closes at six, and is closed on Sundays.",
                    "Write a Python function that adds two numbers."]
_plain_runs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # workbench -> (prompt, tokens) -> trace


def plain_run(wb, prompt: str, tokens: int):
    """Plain decoding's trace, run once per workbench, prompt and length and shared by every drafter's check (a
    run depends only on its spec, prompt and seed)."""
    runs = _plain_runs.setdefault(wb, {})
    if (prompt, tokens) not in runs:
        runs[prompt, tokens] = wb.generate(prompt, f"max_new_tokens={tokens}")
    return runs[prompt, tokens]


def assert_embedded_matches_plain(wb, name: str, tokens: int) -> None:
    decode = EMBEDDED_PARAMS.get(name, name)
    for prompt in EMBEDDED_PROMPTS:
        plain = plain_run(wb, prompt, tokens)
        ours = wb.generate(prompt, f"max_new_tokens={tokens};decode={decode}")
        assert ours.token_ids == plain.token_ids
        assert ours.summary()["target_forwards"] <= plain.summary()["target_forwards"]


@pytest.mark.integration
@pytest.mark.parametrize("name", LOSSLESS)
def test_embedded_greedy_output_equals_plain_decoding(embedded, name):
    """float32 on the real model: every lossless drafter reproduces plain decoding token for token."""
    assert_embedded_matches_plain(embedded, name, 24)


@pytest.fixture(scope="module")
def embedded_bf16():
    from workbench import Workbench

    return Workbench(dtype="bfloat16", device="cpu")


# bf16 keeps 8 bits of mantissa: a logit near 20 moves in steps of 0.125, which changes a probability near
# 0.4 by up to about 0.05. Two tokens closer than NEAR_TIE can swap places when the same row is computed
# inside a batch instead of alone.
NEAR_TIE = 0.1


def assert_embedded_bf16_agrees_with_plain(wb, name: str, tokens: int) -> None:
    """Without the row-independent kernels a verified row is computed inside a batch and rounds differently
    from a one-row step, so a drafter's output is plain decoding's only up to the first near-tie: there
    plain decoding's two best tokens are within bf16 rounding, and either may win."""
    for prompt in EMBEDDED_PROMPTS:
        plain = plain_run(wb, prompt, tokens)
        ours = wb.generate(prompt, f"max_new_tokens={tokens};decode={EMBEDDED_PARAMS.get(name, name)}")
        split = next((i for i, (a, b) in enumerate(zip(plain.token_ids, ours.token_ids)) if a != b), None)
        if split is None:
            assert ours.token_ids == plain.token_ids
            continue
        alternatives = dict([a for e in plain.events for a in e.alternatives][split])  # token -> p
        chosen = alternatives[plain.token_ids[split]]
        assert chosen - alternatives.get(ours.token_ids[split], 0.0) < NEAR_TIE, (name, prompt, split, alternatives)


@pytest.mark.integration
@pytest.mark.parametrize("name", LOSSLESS)
def test_embedded_bf16_output_equals_plain_decoding_on_the_cpu_kernels_and_agrees_without(embedded_bf16, name):
    """bf16 where the workbench's CPU kernels run: they compute each verified row exactly as a one-token step
    would (products and attention alike), so batching a draft changes no rounding and the output is plain
    decoding's token for token. Without them (another CPU, or WORKBENCH_CPU_KERNELS=0) it agrees up to a
    near-tie."""
    if cpu_kernels.available():
        assert_embedded_matches_plain(embedded_bf16, name, 32)
    else:
        assert_embedded_bf16_agrees_with_plain(embedded_bf16, name, 32)


@pytest.mark.integration
def test_embedded_bf16_without_the_cpu_kernels_agrees_with_plain_decoding():
    """The test above in a process with the kernels switched off, so the agreement branch runs here too: for a
    copying drafter, a tree drafter and a draft model (the branch is the same for every drafter; each
    drafter's identity is the test above)."""
    test = "test_embedded_bf16_output_equals_plain_decoding_on_the_cpu_kernels_and_agrees_without"
    drafters = ["prompt_lookup", "token_recycling", "draft_model"]
    assert set(drafters) <= set(LOSSLESS)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "integration",
                             *(f"{__file__}::{test}[{name}]" for name in drafters)],
                            env={**os.environ, "WORKBENCH_CPU_KERNELS": "0"}, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"{len(drafters)} passed" in result.stdout


@pytest.mark.integration
@pytest.mark.skipif(not cpu_kernels.available(), reason="identity in bf16 needs the row-independent CPU kernels")
def test_a_tree_wider_than_a_short_query_is_verified_row_by_row_exactly(embedded_bf16):
    """Token recycling's paper tree verifies 81 nodes at once, more than the short-query limit (64 rows) below
    which attention took the row-independent kernel; it once took the prefill's attention, which rounds
    differently, and its output left plain decoding's at token 50 of this prompt."""
    from workbench.eval.suite import suite

    prompt = suite(["qa"], per_category=2)[1].prompt
    plain = embedded_bf16.generate(prompt, "max_new_tokens=56")
    ours = embedded_bf16.generate(prompt, "max_new_tokens=56;decode=token_recycling:preset=paper")
    assert max(len(e.tree.tokens) if e.tree else 0 for e in ours.events) > 64
    assert ours.token_ids == plain.token_ids
