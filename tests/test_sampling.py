"""The sampler's logits processing, checked against direct computations."""

import pytest
import torch

from workbench.sampling import Sampler

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def test_greedy_is_argmax_and_probs_are_the_softmax():
    s = Sampler()
    assert s.sample(LOGITS).tolist() == [0]
    assert torch.allclose(s.probs(LOGITS), torch.softmax(LOGITS, -1))


def test_temperature_scales_logits():
    assert torch.allclose(Sampler(temperature=0.5).probs(LOGITS), torch.softmax(LOGITS / 0.5, -1))


def test_top_k_keeps_the_k_largest():
    p = Sampler(temperature=1.0, top_k=2).probs(LOGITS)[0]
    expected = torch.softmax(LOGITS[0, :2], -1)
    assert torch.allclose(p[:2], expected) and p[2:].sum() == 0


def test_top_p_keeps_the_smallest_set_reaching_p():
    full = torch.softmax(LOGITS[0], -1)  # 0.54, 0.20, 0.12, 0.07, ...
    p = Sampler(temperature=1.0, top_p=0.7).probs(LOGITS)[0]
    kept = (p > 0).nonzero().flatten().tolist()
    assert kept == [0, 1]  # 0.54 < 0.7, 0.54 + 0.20 >= 0.7
    assert torch.allclose(p[:2], full[:2] / full[:2].sum())


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    full = torch.softmax(LOGITS[0], -1)
    p = Sampler(temperature=1.0, min_p=0.2).probs(LOGITS)[0]
    keep = full >= 0.2 * full.max()
    assert ((p > 0) == keep).all()
    assert torch.allclose(p[keep], full[keep] / full[keep].sum())


def test_draws_follow_the_distribution_and_the_seed():
    s = Sampler(temperature=1.0, seed=1)
    probs = s.probs(LOGITS)
    draws = s.draw(probs.expand(20000, -1))
    freq = torch.bincount(draws, minlength=6).float() / 20000
    assert (freq - probs[0]).abs().max() < 0.015
    again = Sampler(temperature=1.0, seed=1).draw(probs.expand(20000, -1))
    assert torch.equal(draws, again)


@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_p=0.01), dict(min_p=0.99)])
def test_filters_that_leave_one_token_are_deterministic(kwargs):
    s = Sampler(temperature=1.0, seed=3, **kwargs)
    assert s.sample(LOGITS.expand(50, -1)).unique().tolist() == [0]


@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.7}, {"temperature": 1.3, "top_k": 50},
                                    {"temperature": 0.9, "top_p": 0.8}, {"temperature": 1.0, "min_p": 0.05}])
def test_entropy_without_a_log_per_token_equals_the_definition(kwargs):
    torch.manual_seed(0)
    logits = (torch.randn(3, 1000) * 4).bfloat16()
    logits[2, 7] = 60.0  # a near-certain row
    sampler = Sampler(**kwargs)
    probs = sampler.probs(logits)
    h = sampler.entropy(logits, probs, probs.argmax(-1, keepdim=True))
    expected = torch.special.entr(probs.double()).sum(-1, keepdim=True)
    assert h.shape == (3, 1) and (h >= 0).all()
    torch.testing.assert_close(h.double(), expected, atol=2e-5, rtol=1e-5)
