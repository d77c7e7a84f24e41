"""On the embedded model, the settings where the lossy search decoders reduce to greedy decoding reproduce it."""

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # two threads wait on each other on a busy machine

LIMITS = ["adadec:threshold=inf", "astar:budget=1", "superposed:k=1,alpha=0"]


@pytest.fixture(scope="module")
def embedded():
    from workbench import Workbench

    return Workbench(dtype="float32")


@pytest.mark.integration
@pytest.mark.parametrize("decode", LIMITS)
def test_the_greedy_limit_is_plain_decoding_on_the_embedded_model(embedded, decode):
    prompt = "Write a Python function that adds two numbers."
    plain = embedded.generate(prompt, "max_new_tokens=16")
    ours = embedded.generate(prompt, f"max_new_tokens=16;decode={decode}")
    assert ours.token_ids == plain.token_ids
    assert ours.summary()["lossless"] is False and ours.summary()["departures"] == 0
