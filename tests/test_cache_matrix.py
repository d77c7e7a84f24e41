"""Every registered cache policy x every registered drafter, greedy and sampling, on a tiny random model.

- every combination completes, and after every step each layer's bytes, tokens and positions are consistent;
- keeping the whole context (a fraction of 1: nothing evicted or skipped) every policy that has a budget gives
  plain dense decoding's output, token for token, with every lossless drafter: scoring, observers and
  composition corrupt nothing;
- combinations that cannot work refuse with a SpecError.
"""

from dataclasses import dataclass

import pytest
import torch

from workbench import registry
from workbench.cache.base import CachePolicy, KVCache, LayerCache
from workbench.cache.dense import DenseLayerCache
from workbench.decoding.base import Drafter
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.registry import register
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import varied_model
from .test_lossless import TEST_PARAMS as DECODE_PARAMS

pytestmark = pytest.mark.usefixtures("one_thread")

POLICIES = [t.name for t in registry.techniques("cache") if not t.name.startswith("_")]
DRAFTERS = [t.name for t in registry.techniques("decoding")
            if issubclass(t.cls, Drafter) and not t.name.startswith("_")
            and not getattr(t.cls, "needs_training", False)]  # trained drafters: test_draft_heads.py
# Parameters that fit a 24-token prompt on the tiny test models (defaults are sized for real ones).
CACHE_PARAMS = {
    "streaming": {"sinks": 2},
    "snapkv": {"window": 4},
    "ems": {"window": 4},
    "prefix_kv": {"window": 2},
    "double_sparsity": {"channels": 4},
    "shadowkv": {"rank": 4, "chunk": 4, "budget_tokens": 8, "outliers": 1, "local": 4},
    "lserve": {"sink": 2, "local": 4, "page": 2, "physical": 2, "budget_tokens": 4, "probe": 8},
}
EVICTING = {"streaming", "h2o", "snapkv", "ems", "prefix_kv"}  # keeping half the context: fewer tokens than seen
PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6] + [int(t) for t in torch.randint(
    3, 500, (10,), generator=torch.Generator().manual_seed(1))]
NEW_TOKENS = 10
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "seed": 3}


def fraction_param(name: str) -> str | None:
    """The parameter that keeps a fraction of the context: `fraction` (streaming, h2o, snapkv, whose `budget`
    counts tokens) or `budget` (ems, prefix_kv, double_sparsity); None for policies without one."""
    params = {p.name for p in registry.get("cache", name).params}
    return "fraction" if "fraction" in params else "budget" if "budget" in params else None


def has_budget(name: str) -> bool:
    return fraction_param(name) is not None


def cache_spec(name: str, share: float | None = None, **params) -> TechniqueSpec:
    """`share`: the fraction of the context kept, set on the policy's fraction parameter."""
    if share is not None:
        params[fraction_param(name)] = share
    return TechniqueSpec(name, {**CACHE_PARAMS.get(name, {}), **params})


def decode_spec(name: str) -> TechniqueSpec:
    return TechniqueSpec(name, DECODE_PARAMS.get(name, {}))


@dataclass
class CheckLayers(CachePolicy):
    """Appended to a run's policies: after the prefill and every step (after the policies before it), checks
    each layer's invariants and records the tokens it holds."""

    context: int = 0
    held: list = None

    def on_prefill_end(self, cache: KVCache) -> None:
        self.context = len(PROMPT)
        self.held = []
        self._check(cache)

    def on_step_end(self, cache: KVCache) -> None:
        self.context = max(int(layer.positions.max()) for layer in cache.layers) + 1
        self._check(cache)

    def _check(self, cache: KVCache) -> None:
        for layer in cache.layers:
            assert layer.n_committed == layer.length  # drafts never stay behind after a step
            positions = layer.positions
            assert positions.shape[1] == layer.length
            assert bool((positions[:, 1:] > positions[:, :-1]).all()), "positions out of order in a head"
            assert int(positions.min()) >= 0 and int(positions.max()) == self.context - 1  # newest always held
            per_head = layer.nbytes_per_head()
            assert per_head.shape == (positions.shape[0],) and bool((per_head > 0).all())
            assert layer.nbytes() == int(per_head.sum())
        self.held.append(cache.tokens_per_layer())


def run(model, spec: RunSpec) -> tuple[list[int], CheckLayers]:
    engine = Engine(model, spec)
    check = CheckLayers()
    engine.policies.append(check)
    tokens = [t for event in engine.run(PROMPT) for t in event.tokens]
    return tokens, check


@pytest.fixture(scope="module")
def model():
    return varied_model("llama")


@pytest.fixture(scope="module")
def plain(model):
    return {mode: run(model, RunSpec(max_new_tokens=NEW_TOKENS, **extra))[0]
            for mode, extra in (("greedy", {}), ("sampling", SAMPLING))}


def test_the_matrix_covers_the_eviction_policies_and_drafters():
    assert {"streaming", "h2o", "snapkv", "ems", "double_sparsity", "prefix_kv"} <= set(POLICIES)
    assert {"plain", "prompt_lookup", "draft_model", "layer_skip"} <= set(DRAFTERS)


@pytest.mark.parametrize("mode", ["greedy", "sampling"])
@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_runs_with_every_drafter(model, policy, drafter, mode):
    spec = RunSpec(max_new_tokens=NEW_TOKENS, cache=[cache_spec(policy, 0.5 if has_budget(policy) else None)],
                   decode=decode_spec(drafter),
                   **(SAMPLING if mode == "sampling" else {}))
    tokens, check = run(model, spec)
    assert len(tokens) == NEW_TOKENS
    assert len(check.held) >= 2  # the prefill and at least one step were checked
    if policy in EVICTING:
        assert max(check.held[-1]) < check.context


def _reproduces_plain(drafter: str, mode: str) -> bool:
    """Lossless drafters give plain decoding's greedy output; its sampled output only when verified by matching
    (which draws once per committed token, in plain decoding's order)."""
    technique = registry.get("decoding", drafter)
    return bool(technique.lossless) and (mode == "greedy" or technique.cls.default_acceptor == "match")


@pytest.mark.parametrize(("drafter", "mode"), [(d, m) for d in DRAFTERS for m in ("greedy", "sampling")
                                               if _reproduces_plain(d, m)])
@pytest.mark.parametrize("policy", [p for p in POLICIES if has_budget(p)])
def test_budget_one_gives_plain_dense_output(model, plain, policy, drafter, mode):
    spec = RunSpec(max_new_tokens=NEW_TOKENS, cache=[cache_spec(policy, share=1.0)], decode=decode_spec(drafter),
                   **(SAMPLING if mode == "sampling" else {}))
    tokens, check = run(model, spec)
    assert tokens == plain[mode]
    assert check.held[-1] == [check.context] * model.config.num_layers  # nothing evicted


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_continuous_policies_hold_their_budget_while_decoding(model, policy):
    _, check = run(model, RunSpec(max_new_tokens=NEW_TOKENS, cache=[cache_spec(policy, share=0.5)]))
    for step, held in enumerate(check.held):
        context = len(PROMPT) + step
        assert held == [-(-context // 2)] * model.config.num_layers


@pytest.mark.parametrize("policy, extra", [("snapkv", {}), ("ems", {}), ("streaming", {"continuous": False}),
                                           ("h2o", {"continuous": False})])
def test_prefill_policies_compress_the_prompt_then_keep_every_new_token(model, policy, extra):
    _, check = run(model, RunSpec(max_new_tokens=NEW_TOKENS, cache=[cache_spec(policy, share=0.5, **extra)]))
    assert [held[0] for held in check.held] == [len(PROMPT) // 2 + step for step in range(len(check.held))]


def test_prefix_kv_budgets_differ_across_layers_and_add_up(model):
    _, check = run(model, RunSpec(max_new_tokens=NEW_TOKENS, cache=[cache_spec("prefix_kv", share=0.5)]))
    assert sum(check.held[0]) == model.config.num_layers * len(PROMPT) // 2
    assert len(set(check.held[0])) > 1


def test_eviction_then_another_policy_composes(model):
    spec = RunSpec(max_new_tokens=NEW_TOKENS, cache=[cache_spec("snapkv", share=0.5), cache_spec("h2o", share=0.5),
                                                     cache_spec("double_sparsity", share=0.5)])
    tokens, check = run(model, spec)
    assert len(tokens) == NEW_TOKENS and check.held[-1][0] < len(PROMPT) + NEW_TOKENS - 1


# Refusals: a storage form that is neither dense nor double sparsity's own.
class _OtherLayerCache(LayerCache):
    """Stands in for any other storage form (cache-A's quantized and sparse ones are checked too): dense inside,
    but not a DenseLayerCache, so nothing may rewrite its buffers."""

    def __init__(self, *args):
        self.inner = DenseLayerCache(*args)

    def append(self, k, v, positions):
        self.inner.append(k, v, positions)

    def view(self):
        return self.inner.view()

    def keep(self, slots):
        self.inner.keep(slots)
        self.n_committed = self.inner.length

    def truncate(self, length):
        self.inner.truncate(length)

    @property
    def length(self):
        return self.inner.length

    @property
    def positions(self):
        return self.inner.positions

    def nbytes_per_head(self):
        return self.inner.nbytes_per_head()


@register("cache", "_test_other_storage", lossless=True)
@dataclass
class _OtherStorage(CachePolicy):
    """A storage form other than the dense one, for the refusal tests."""

    def make_layer_cache(self, layer, config, dtype, device, capacity):
        return _OtherLayerCache(config.num_kv_heads, config.head_dim, dtype, device, capacity)


def foreign_storage(model) -> list[str]:
    """Registered policies whose layer caches are another storage form (cache-A's), and the stand-in."""
    out = ["_test_other_storage"]
    for name in POLICIES:
        layer = registry.get("cache", name).build(CACHE_PARAMS.get(name, {})).make_layer_cache(
            0, model.config, model.dtype, model.device, 8)
        if layer is not None and not isinstance(layer, DenseLayerCache):
            out.append(name)
    return out


def test_double_sparsity_refuses_a_later_storage_form(model):
    for other in foreign_storage(model):
        spec = RunSpec(max_new_tokens=2, cache=[cache_spec("double_sparsity"), cache_spec(other)])
        with pytest.raises(SpecError, match="double_sparsity computes attention over its own dense store"):
            list(Engine(model, spec).run(PROMPT))


def test_ems_refuses_a_storage_form_it_cannot_rewrite(model):
    for other in foreign_storage(model):
        spec = RunSpec(max_new_tokens=2, cache=[cache_spec(other), cache_spec("ems")])
        with pytest.raises(SpecError, match="ems merges evicted tokens into kept ones"):
            list(Engine(model, spec).run(PROMPT))
    # without merging, EMS only drops tokens, which every storage form supports
    spec = RunSpec(max_new_tokens=2, cache=[cache_spec("_test_other_storage"), cache_spec("ems", merge=0.0)])
    assert len([t for e in Engine(model, spec).run(PROMPT) for t in e.tokens]) == 2


def test_double_sparsity_refuses_more_channels_than_the_head_has(model):
    spec = RunSpec(max_new_tokens=2, cache=[TechniqueSpec("double_sparsity", {"channels": model.config.head_dim + 1})])
    with pytest.raises(SpecError, match="exceeds this model's head_dim"):
        list(Engine(model, spec).run(PROMPT))


@pytest.mark.parametrize("eviction", ["streaming", "h2o", "snapkv", "prefix_kv", "ems"])
def test_eviction_followed_by_every_storage_form(model, eviction):
    """Eviction then quantization or sparsity (every other registered storage form), with a drafter."""
    for storage in foreign_storage(model):
        merge = {"merge": 0.0} if eviction == "ems" else {}  # merging needs the dense form (refusal tested above)
        spec = RunSpec(max_new_tokens=NEW_TOKENS, decode=decode_spec("draft_model"),
                       cache=[cache_spec(eviction, share=0.5, **merge), cache_spec(storage)])
        if storage in ("shadowkv", "lserve"):  # they move the whole prompt, so they must come before any eviction
            with pytest.raises(SpecError, match="put it first in the cache chain"):
                run(model, spec)
            continue
        tokens, check = run(model, spec)
        assert len(tokens) == NEW_TOKENS and max(check.held[-1]) < check.context, storage
