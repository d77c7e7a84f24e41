"""Cache bytes are what the process holds: allocated storage beside the live part, for every policy."""

import pytest
import torch

from workbench import registry
from workbench.engine import Engine
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
