"""Model-level features the later techniques rely on: layer plans, hidden states, masks, last-only logits."""

import pytest
import torch

from workbench.engine import build_cache
from workbench.models.random import random_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return random_model("llama", seed=3)


def test_layer_plan_runs_only_the_listed_layers(model):
    cache = build_cache(model, [], 64)
    tokens = torch.tensor([4, 8, 15, 16])
    out = model(tokens, torch.arange(4), cache, layers=[0, 2], hidden_states=True)
    assert cache.tokens_per_layer() == [4, 0, 4, 0]
    assert len(out.hidden_states) == 3  # input to layer 0, to layer 2, and the output
    manual = model.layers[2](model.layers[0](out.hidden_states[0], *_rope(model, 4), None, None), *_rope(model, 4),
                             None, None)
    assert torch.allclose(out.hidden_states[-1], manual, atol=1e-6)
    assert torch.allclose(out.logits, model.logits(manual))
    cache.rollback()
    assert cache.tokens_per_layer() == [0, 0, 0, 0]


def _rope(model, n):
    positions = torch.arange(n)
    freqs = positions.float()[:, None, None] * model.inv_freq
    sin = freqs.sin()
    return freqs.cos().repeat(1, 1, 2), torch.cat((-sin, sin), -1), positions


def test_cached_decoding_equals_one_full_forward(model):
    tokens = torch.randint(0, 512, (12,))
    full = model(tokens, torch.arange(12)).logits
    cache = build_cache(model, [], 4)  # grows past its capacity on the way
    model(tokens[:5], torch.arange(5), cache)
    rows = [model(tokens[i:i + 1], torch.tensor([i]), cache).logits for i in range(5, 12)]
    assert torch.allclose(torch.cat(rows), full[5:], atol=1e-5)


def test_mask_limits_what_new_tokens_see(model):
    """Two siblings verified together get the logits each would get alone after the shared prefix."""
    prefix, a, b = torch.tensor([1, 2, 3]), torch.tensor([7]), torch.tensor([9])
    alone_a = model(torch.cat([prefix, a]), torch.arange(4)).logits[-1]
    alone_b = model(torch.cat([prefix, b]), torch.arange(4)).logits[-1]
    cache = build_cache(model, [], 16)
    model(prefix, torch.arange(3), cache)
    mask = torch.tensor([[True, False], [False, True]])
    both = model(torch.cat([a, b]), torch.tensor([3, 3]), cache, mask=mask).logits
    assert torch.allclose(both[0], alone_a, atol=1e-5) and torch.allclose(both[1], alone_b, atol=1e-5)


def test_last_only_and_dtype_of_logits(model):
    tokens = torch.tensor([3, 1, 4, 1, 5])
    full = model(tokens, torch.arange(5)).logits
    last = model(tokens, torch.arange(5), last_only=True).logits
    assert last.shape == (1, 512) and torch.allclose(last[0], full[-1], atol=1e-6) and last.dtype == torch.float32


def test_rope_frequencies_stay_float32_when_the_model_is_cast():
    model = random_model("llama3", dtype=torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
