"""ShadowKV: two tiers of real bytes, the traffic back counted, keys rebuilt from pre-RoPE factors."""

from dataclasses import dataclass

import pytest
import torch

from workbench.cache.base import CachePolicy, KVCache
from workbench.cache.shadowkv import ShadowKVLayerCache, rotate
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.models.random import random_model
from workbench.spec import RunSpec, TechniqueSpec

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [int(t) for t in torch.randint(3, 500, (300,), generator=torch.Generator().manual_seed(5))]
NEW = 8
SMALL = {"rank": 8, "chunk": 8, "budget_tokens": 32, "outliers": 2, "local": 16}


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
    engine = Engine(model, RunSpec(max_new_tokens=NEW, cache=[TechniqueSpec("shadowkv", params)]))
    grab = Grab()
    engine.policies.append(grab)
    events = list(engine.run(PROMPT))
    return events, grab.cache


def test_rope_inverse_undoes_rope():
    x = torch.randn(2, 5, 16)
    pos = torch.tensor([0, 3, 7, 100, 4000])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2) / 16))
    assert torch.allclose(rotate(rotate(x, pos, inv_freq), pos, inv_freq, inverse=True), x, atol=1e-5)


def test_fast_and_off_tier_bytes_are_the_tensors_storages(model):
    events, cache = run(model, **SMALL)
    fast = off = 0
    for layer in cache.layers:
        assert isinstance(layer, ShadowKVLayerCache) and layer.n_prefix == (len(PROMPT) - 1 - 16) // 8 * 8
        held = (layer.u, layer.w, layer.landmarks, layer.outlier, layer.outlier_k, layer.outlier_v,
                layer.tail.k, layer.tail.v, layer.tail.pos)
        fast += sum(t.untyped_storage().nbytes() for t in held)
        off += layer.host_v.untyped_storage().nbytes()
        assert layer.host_v.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in held}
        assert layer.host_v.shape == (model.config.num_kv_heads, layer.n_prefix, model.config.head_dim)
    assert events[-1].cache_bytes == fast and events[-1].cache_off_bytes == off > 0
    dense = next(iter(Engine(model, RunSpec(max_new_tokens=1)).run(PROMPT))).cache_bytes
    assert events[-1].cache_bytes < 0.5 * dense  # the fast tier holds far less than a dense cache


def test_each_decoding_step_fetches_only_the_selected_chunks(model):
    events, cache = run(model, **SMALL)
    c = model.config
    per_step = c.num_layers * c.num_kv_heads * 32 * c.head_dim * 4  # 32 tokens' values, float32, per kv head
    assert events[0].cache_moved_bytes == 0  # the prefill attends densely
    assert [e.cache_moved_bytes for e in events[1:]] == [per_step * s for s in range(1, len(events))]
    assert events[-1].cache_moved_ns > 0


def test_full_rank_and_every_chunk_attended_is_the_dense_output(model):
    full = model.config.num_kv_heads * model.config.head_dim
    _, cache = run(model, rank=full, chunk=8, budget_tokens=4096, outliers=2, local=16)
    layer = cache.layers[0]
    k, v = layer.view()
    assert k.shape[1] == layer.length
    dense = [t for e in Engine(model, RunSpec(max_new_tokens=NEW)).run(PROMPT) for t in e.tokens]
    shadow = [t for e in run(model, rank=full, chunk=8, budget_tokens=4096, outliers=2, local=16)[0]
              for t in e.tokens]
    assert shadow == dense


def test_a_later_policy_replacing_its_storage_is_refused(model):
    spec = RunSpec(max_new_tokens=2, cache=[TechniqueSpec("shadowkv", SMALL), TechniqueSpec("kivi")])
    with pytest.raises(SpecError, match="shadowkv keeps its own two-tier form"):
        list(Engine(model, spec).run(PROMPT))
