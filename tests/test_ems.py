"""EMS on its own: the global-local score against a direct computation, the class assignment and merge (per
head, the zero class dropped), the merge share, budget=1 with lossless drafters, and refused parameters."""

import pytest
import torch

from workbench.cache.base import KVCache
from workbench.cache.dense import DenseLayerCache
from workbench.cache.ems import EMSPolicy, assign_classes, global_local_score
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.models.attention import attention
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import varied_model
from .test_lossless import TEST_PARAMS as DECODE_PARAMS

KV_HEADS, GROUP, DIM = 2, 2, 8
PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6] + [int(t) for t in torch.randint(
    3, 500, (10,), generator=torch.Generator().manual_seed(1))]
NEW_TOKENS = 8


def dense_layer() -> DenseLayerCache:
    return DenseLayerCache(KV_HEADS, DIM, torch.float32, torch.device("cpu"), 8)


@pytest.mark.parametrize("n", [10, 300])  # a short prompt keeps per-query rows; one over 256 queries sums them
def test_global_local_score_is_the_formula_computed_directly(n):
    torch.manual_seed(0)
    window = 3
    layer, policy = dense_layer(), EMSPolicy(window=window)
    policy.on_cache_built(KVCache([layer]))
    q, k = torch.randn(KV_HEADS * GROUP, n, DIM), torch.randn(KV_HEADS, n, DIM)
    attention(q.transpose(0, 1), k.transpose(0, 1), k.transpose(0, 1), torch.arange(n), layer, None)
    layer.commit()
    got = global_local_score(layer, policy._global[0], policy._local[0])
    # the softmax attention of each query head, causal, summed over the query heads sharing a kv head
    logits = q.view(KV_HEADS, GROUP, n, DIM) @ k[:, None].transpose(-1, -2) / DIM**0.5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1).sum(1)  # [kv_heads, query, key]
    mean_received = probs.sum(1) / causal.sum(0)  # key j is seen by the n - j queries from j on
    window_vote = probs[:, n - window:].sum(1)
    expected = (mean_received / mean_received.sum(1, keepdim=True)
                + window_vote / window_vote.sum(1, keepdim=True))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert torch.allclose(got.sum(1), torch.full((KV_HEADS,), 2.0))


def redundant_and_distinct_heads() -> tuple[DenseLayerCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Six tokens. Head 0's keys are redundant: tokens 1, 2 point like token 0, tokens 3, 4 like token 5.
    Head 1's tokens 1-4 point away from both token 0 and token 5. Values name their token and head."""
    e = torch.eye(DIM)
    keys = torch.stack([
        torch.stack([e[0], 2 * e[0], e[0] + 0.2 * e[1], 3 * e[2], e[2] + 0.1 * e[0], e[2]]),
        torch.stack([e[0], -e[0], e[1], -e[2], e[3], e[2]]),
    ])
    values = (torch.arange(6.0)[None, :, None] + 10 * torch.arange(KV_HEADS)[:, None, None]).expand(-1, -1, DIM)
    values = values + torch.arange(DIM) / 100  # channels differ too
    layer = dense_layer()
    layer.append(keys.clone(), values.clone(), torch.arange(6))
    layer.commit()
    score = torch.tensor([[4.0, 1.0, 0.9, 0.8, 0.7, 0.1]] * KV_HEADS)  # token 0 best; token 5 is the window
    return layer, keys, values, score


def weighted_mean(x: torch.Tensor, score: torch.Tensor, members: list[int]) -> torch.Tensor:
    w = score[members]
    return (w[:, None] * x[members]).sum(0) / w.sum()


def test_each_head_merges_its_similar_tokens_into_score_weighted_means_and_drops_the_zero_class():
    layer, keys, values, score = redundant_and_distinct_heads()
    merged = EMSPolicy(budget=1 / 3, threshold=0.5, merge=1.0)._compress(layer, score, keep=2, window=1)
    k, v = layer.view()
    assert layer.positions.tolist() == [[0, 5]] * KV_HEADS
    # head 0: every non-kept token joined a class (redundant head); classes {0, 1, 2} and {5, 3, 4}
    for slot, members in ((0, [0, 1, 2]), (1, [5, 3, 4])):
        assert torch.allclose(k[0, slot], weighted_mean(keys[0], score[0], members))
        assert torch.allclose(v[0, slot], weighted_mean(values[0], score[0], members))
    # head 1: nothing is similar enough, so all four went to the zero class and the kept tokens are unchanged
    assert torch.allclose(k[1], keys[1, [0, 5]]) and torch.allclose(v[1], values[1, [0, 5]])
    assert merged.tolist() == [4, 0]  # the split between merging and evicting differs per head


def test_the_merge_share_lets_only_the_best_scored_non_kept_tokens_join():
    layer, keys, values, score = redundant_and_distinct_heads()
    merged = EMSPolicy(budget=1 / 3, merge=0.5)._compress(layer, score, keep=2, window=1)
    k, v = layer.view()
    assert merged.tolist() == [2, 0]  # tokens 1 and 2 (best-scored); 3 and 4 evicted outright
    assert torch.allclose(v[0, 0], weighted_mean(values[0], score[0], [0, 1, 2]))
    assert torch.allclose(v[0, 1], values[0, 5]) and torch.allclose(k[0, 1], keys[0, 5])  # nothing joined it


def test_merge_zero_only_evicts():
    layer, keys, values, score = redundant_and_distinct_heads()
    merged = EMSPolicy(budget=1 / 3, merge=0.0)._compress(layer, score, keep=2, window=1)
    assert merged.tolist() == [0, 0]
    assert torch.equal(layer.view()[0], keys[:, [0, 5]]) and torch.equal(layer.view()[1], values[:, [0, 5]])


def test_class_assignment_in_blocks_equals_one_block():
    torch.manual_seed(1)
    k_cand, k_kept = torch.randn(KV_HEADS, 50, DIM), torch.randn(KV_HEADS, 7, DIM)
    target, joins = assign_classes(k_cand, k_kept, 0.3)
    blocked = assign_classes(k_cand, k_kept, 0.3, chunk=8)
    assert torch.equal(target, blocked[0]) and torch.equal(joins, blocked[1])
    cosine = torch.nn.functional.cosine_similarity(k_cand[:, :, None], k_kept[:, None], dim=-1)
    best = cosine.max(-1).values
    clear = (best - 0.3).abs() > 1e-4  # rounding may differ between the two computations right at the threshold
    assert torch.equal(target, cosine.argmax(-1)) and torch.equal(joins[clear], (best >= 0.3)[clear])
    assert bool(joins.any()) and not bool(joins.all())  # both outcomes occur in this example


@pytest.fixture(scope="module")
def model():
    return varied_model("llama")


def run(model, **spec) -> tuple[list[int], EMSPolicy]:
    engine = Engine(model, RunSpec(max_new_tokens=NEW_TOKENS, **spec))
    tokens = [t for event in engine.run(PROMPT) for t in event.tokens]
    return tokens, engine.policies[0] if engine.policies else None


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("drafter", ["plain", "prompt_lookup", "draft_model"])
def test_budget_one_is_plain_dense_decoding_with_lossless_drafters(model, drafter):
    plain, _ = run(model)
    decode = TechniqueSpec(drafter, DECODE_PARAMS.get(drafter, {}))
    tokens, policy = run(model, decode=decode, cache=[TechniqueSpec("ems", {"budget": 1.0, "window": 4})])
    assert tokens == plain
    assert [m.tolist() for m in policy.merged] == [[0] * model.config.num_kv_heads] * model.config.num_layers


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("drafter", ["plain", "prompt_lookup", "draft_model"])
def test_drafters_run_at_half_budget_and_every_layer_reports_its_merges(model, drafter):
    decode = TechniqueSpec(drafter, DECODE_PARAMS.get(drafter, {}))
    tokens, policy = run(model, decode=decode, cache=[TechniqueSpec("ems", {"budget": 0.5, "window": 4,
                                                                            "threshold": 0.0})])
    assert len(tokens) == NEW_TOKENS
    non_kept = len(PROMPT) - len(PROMPT) // 2
    assert len(policy.merged) == model.config.num_layers
    for merged in policy.merged:
        assert merged.shape == (model.config.num_kv_heads,) and bool(((merged >= 0) & (merged <= non_kept)).all())
    assert sum(int(m.sum()) for m in policy.merged) > 0  # with threshold 0 some tokens do join a class


@pytest.mark.parametrize("params", [{"budget": 0.0}, {"budget": 1.5}, {"window": 0}, {"merge": -0.1},
                                    {"merge": 1.5}, {"threshold": 1.5}, {"threshold": -2.0}, {"merge": "half"},
                                    {"sinks": 4}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(SpecError, match="ems|budget"):
        RunSpec(cache=[TechniqueSpec("ems", params)]).validated()
