"""Cache bytes are what the process holds: allocated storage beside the live part, for every policy."""

from dataclasses import dataclass

import pytest
import torch

from workbench import registry
from workbench.decoding.base import Drafter, DraftTree
from workbench.engine import Engine
from workbench.registry import register
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import PROMPTS, varied_model


@pytest.fixture(scope="module")
def model():
    return varied_model()


def _storages(layer) -> int:
    """An independent count for the dense form: its three buffers' own storages."""
    return sum(t.untyped_storage().nbytes() for t in (layer.k, layer.v, layer.pos))


def test_dense_allocated_bytes_are_its_buffers_storages(model):
    from workbench.engine import build_cache

    cache = build_cache(model, [], 64)
    with torch.inference_mode():
        model(torch.tensor(PROMPTS[0]), torch.arange(len(PROMPTS[0])), cache)
    cache.commit()
    assert cache.allocated_bytes() == sum(_storages(layer) for layer in cache.layers)
    per_token = model.config.num_kv_heads * (2 * model.config.head_dim * 4 + 8)  # float32 k, v, an int64 position
    assert cache.nbytes() == len(PROMPTS[0]) * per_token * len(cache.layers) < cache.allocated_bytes()


@pytest.mark.parametrize("policy", [t.name for t in registry.techniques("cache")])
def test_live_bytes_never_exceed_what_is_allocated(model, policy):
    spec = RunSpec(max_new_tokens=8, cache=[TechniqueSpec(policy)])
    events = list(Engine(model, spec).run(PROMPTS[0] * 3))
    for event in events:
        assert 0 < event.cache_live_bytes <= event.cache_bytes
    summary_keys = {"cache_bytes", "cache_live_bytes"}
    assert summary_keys <= set(vars(events[-1]))


def test_allocated_bytes_count_each_storage_once():
    from workbench.cache.base import tensor_storage_bytes

    base = torch.zeros(100)
    holder = type("Holder", (), {})()
    holder.a, holder.b, holder.views = base, base[10:20], [base[:5], {"x": torch.zeros(3, dtype=torch.int64)}]
    assert tensor_storage_bytes(holder, set()) == 100 * 4 + 3 * 8


ORACLE: list[int] = []  # the output plain decoding gives, which the oracle drafter proposes


@register("decoding", "_test_oracle", lossless=True)
@dataclass
class Oracle(Drafter):
    """Drafts the next four tokens of plain decoding's output: every draft is accepted."""

    def propose(self, state):
        done = len(state.generated)
        return DraftTree.chain(ORACLE[done:done + 4])


@pytest.mark.parametrize("cache", [[], [TechniqueSpec("kivi", {"bits": 2, "residual": 4})]], ids=["dense", "kivi"])
def test_a_run_ending_inside_an_accepted_draft_caches_exactly_its_context(model, cache):
    """The last step may accept more than the budget keeps: the cache must still hold what plain decoding's
    does (the context less the pending token), with the same bytes."""
    prompt = PROMPTS[1]
    ORACLE[:] = [t for e in Engine(model, RunSpec(max_new_tokens=40, cache=cache)).run(prompt) for t in e.tokens]
    for budget in (6, 7, 8, 9):  # steps of 5 tokens after the prefill's 1: budgets 7-9 end inside a step
        plain = list(Engine(model, RunSpec(max_new_tokens=budget, cache=cache)).run(prompt))
        drafted = list(Engine(model, RunSpec(max_new_tokens=budget, cache=cache,
                                             decode=TechniqueSpec("_test_oracle"))).run(prompt))
        assert [t for e in drafted for t in e.tokens] == [t for e in plain for t in e.tokens] == ORACLE[:budget]
        assert drafted[-1].cache_tokens == plain[-1].cache_tokens
        assert drafted[-1].cache_live_bytes == plain[-1].cache_live_bytes
