"""LServe: streaming heads hold only sinks and the tail, dense heads' pages sit in the off tier and only the selected
physical pages come back; refusals for what it cannot work with."""

from dataclasses import dataclass

import pytest
import torch

from workbench.cache.base import CachePolicy, KVCache
from workbench.cache.lserve import LServeLayerCache
from workbench.engine import Engine, build_cache
from workbench.errors import SpecError
from workbench.models.random import random_model
from workbench.spec import RunSpec, TechniqueSpec

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [int(t) for t in torch.randint(3, 500, (300,), generator=torch.Generator().manual_seed(5))]
NEW = 8
SMALL = {"sink": 4, "local": 16, "page": 4, "physical": 2, "budget_tokens": 32, "probe": 16}


@pytest.fixture(scope="module")
def model():
    return random_model("llama", seed=3, num_hidden_layers=2, max_position_embeddings=4096)


@dataclass
class Grab(CachePolicy):
    """Appended last: keeps the cache so the test can look at it after the run."""

    cache: KVCache | None = None

    def on_cache_built(self, cache: KVCache) -> None:
        self.cache = cache


def run(model, **params):
    engine = Engine(model, RunSpec(max_new_tokens=NEW, cache=[TechniqueSpec("lserve", params)]))
    grab = Grab()
    engine.policies.append(grab)
    events = list(engine.run(PROMPT))
    return events, grab.cache


def test_fast_and_off_tier_bytes_are_the_tensors_storages(model):
    events, cache = run(model, **SMALL)
    c = model.config
    fast = off = streaming = 0
    for layer in cache.layers:
        assert isinstance(layer, LServeLayerCache) and layer.n_prefix == (len(PROMPT) - 1 - 16) // 8 * 8
        s = int(layer.streaming.sum())
        streaming += s
        assert layer.sink_k.shape == (s, 4, c.head_dim)  # streaming heads: their sinks alone
        assert layer.host_k.shape == layer.host_v.shape == (c.num_kv_heads - s, layer.n_prefix, c.head_dim)
        assert layer.k_min.shape == (c.num_kv_heads - s, layer.n_prefix // 4, c.head_dim)
        held = (layer.sink_k, layer.sink_v, layer.k_min, layer.k_max, layer.tail.k, layer.tail.v, layer.tail.pos)
        fast += sum(t.untyped_storage().nbytes() for t in held)
        off += sum(t.untyped_storage().nbytes() for t in (layer.host_k, layer.host_v))
        assert not {t.untyped_storage().data_ptr() for t in (layer.host_k, layer.host_v)} & \
            {t.untyped_storage().data_ptr() for t in held}
    assert streaming == round(0.5 * c.num_layers * c.num_kv_heads)
    assert events[-1].cache_bytes == fast and events[-1].cache_off_bytes == off > 0
    dense = next(iter(Engine(model, RunSpec(max_new_tokens=1)).run(PROMPT))).cache_bytes
    assert events[-1].cache_bytes < 0.5 * dense
    # per head: a streaming head holds less than a dense one (its sinks against the dense head's key bounds)
    per_head = cache.layers[0].nbytes_per_head()
    if 0 < int(cache.layers[0].streaming.sum()) < c.num_kv_heads:
        assert per_head[cache.layers[0].streaming].max() < per_head[~cache.layers[0].streaming].min()


def test_each_decoding_step_fetches_only_the_selected_pages_of_dense_heads(model):
    events, cache = run(model, **SMALL)
    c = model.config
    dense_heads = sum(int((~layer.streaming).sum()) for layer in cache.layers)
    per_step = dense_heads * 32 * c.head_dim * 4 * 2  # 32 tokens' keys and values, float32, per dense kv head
    assert events[0].cache_moved_bytes == 0  # the prefill attends densely
    assert [e.cache_moved_bytes for e in events[1:]] == [per_step * s for s in range(1, len(events))]


def test_streaming_heads_are_those_most_on_their_sinks_and_window(model):
    _, cache = run(model, **SMALL)
    mass = torch.stack([layer.local_mass for layer in cache.layers]).flatten()
    chosen = torch.stack([layer.streaming for layer in cache.layers]).flatten()
    assert mass[chosen].min() >= mass[~chosen].max()


def test_no_streaming_heads_and_every_page_read_is_the_dense_output(model):
    dense = [t for e in Engine(model, RunSpec(max_new_tokens=NEW)).run(PROMPT) for t in e.tokens]
    events, _ = run(model, **{**SMALL, "streaming": 0.0, "budget_tokens": 4096})
    assert [t for e in events for t in e.tokens] == dense
    sparse, _ = run(model, **{**SMALL, "streaming": 1.0})
    assert sparse[-1].cache_moved_bytes == 0  # streaming heads alone never fetch


@pytest.mark.parametrize("name, params", [
    ("lserve", SMALL), ("shadowkv", {"rank": 8, "chunk": 8, "budget_tokens": 32, "outliers": 2, "local": 16})])
def test_a_two_tier_prefill_computes_the_dense_caches_logits(model, name, params):
    # before the prompt moves into the two tiers the layer attends as the dense cache does, so a near-tie in
    # the first answer token breaks the same way (TwoTierLayerCache.attends_itself)
    ids, positions = torch.tensor(PROMPT), torch.arange(len(PROMPT))
    logits = []
    for policies in ([], [TechniqueSpec(name, params).build("cache")]):
        cache = build_cache(model, policies, len(PROMPT) + NEW)
        logits.append(model.forward(ids, positions, cache, last_only=True).logits)
        assert not any(layer.attends_itself for layer in cache.layers)
    assert torch.equal(logits[0], logits[1])


def test_the_prefill_measures_the_heads_and_the_paged_layers_attend_themselves(model):
    _, cache = run(model, **SMALL)
    assert all(layer.local_mass is not None for layer in cache.layers)
    assert all(layer.observer is None and layer.attends_itself for layer in cache.layers)


def test_what_it_cannot_work_with_is_refused(model):
    spec = RunSpec(max_new_tokens=2, cache=[TechniqueSpec("lserve", SMALL), TechniqueSpec("kivi")])
    with pytest.raises(SpecError, match="lserve keeps its own two-tier form"):
        list(Engine(model, spec).run(PROMPT))
    spec = RunSpec(max_new_tokens=4, cache=[TechniqueSpec("lserve", SMALL),
                                            TechniqueSpec("streaming", {"sinks": 4, "window": 16})])
    with pytest.raises(SpecError, match="cannot evict"):
        list(Engine(model, spec).run(PROMPT))
    with pytest.raises(SpecError, match="sink .* must fit in one physical page"):
        RunSpec(cache=[TechniqueSpec("lserve", {"sink": 64, "page": 4, "physical": 2})]).validated()
