"""Every lossless drafter in the registry: greedy output is plain decoding's, token for token, and sampled
output (verified by matching) is plain decoding's sample for the same seed."""

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
            if t.lossless and issubclass(t.cls, Drafter) and not t.name.startswith("_") and t.name != "plain"]
# Parameters that fit the tiny 4-layer test models (defaults are sized for real ones).
TEST_PARAMS = {
    "draft_model": {"layers": 2},
    "rsd": {"layers": 2},
    "dyspec": {"layers": 2},
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


def assert_embedded_matches_plain(wb, name: str, tokens: int) -> None:
    prompts = ["Summarise in one sentence: The library opens at nine, closes at six, and is closed on Sundays.",
               "Write a Python function that adds two numbers."]
    decode = EMBEDDED_PARAMS.get(name, name)
    for prompt in prompts:
        plain = wb.generate(prompt, f"max_new_tokens={tokens}")
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


@pytest.mark.integration
@pytest.mark.skipif(not cpu_kernels.available(), reason="needs the workbench's CPU kernels (C compiler, AVX512-BF16)")
@pytest.mark.parametrize("name", LOSSLESS)
def test_embedded_bf16_greedy_output_equals_plain_decoding_on_the_cpu_kernels(embedded_bf16, name):
    """bf16 too, where the workbench's CPU kernels run: they compute each verified row exactly as a one-token
    step would (products and attention alike), so batching a draft changes no rounding."""
    assert_embedded_matches_plain(embedded_bf16, name, 32)
