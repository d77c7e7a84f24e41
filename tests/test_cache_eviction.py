"""The eviction policies one by one: which tokens each keeps, budget arithmetic, positions after eviction,
per-head selections, and the attention observer, which never counts rejected drafts."""

import pytest
import torch

from workbench.cache.base import KVCache
from workbench.cache.dense import DenseLayerCache
from workbench.cache.double_sparsity import DoubleSparsityLayerCache, outlier_channels
from workbench.cache.ems import EMSPolicy
from workbench.cache.h2o import H2OPolicy
from workbench.cache.prefix_kv import PrefixKVPolicy, layer_budgets, prefix_curve
from workbench.cache.scores import AccumulatedAttention, attach, kept_count, kept_tokens, select
from workbench.cache.snapkv import SnapKVPolicy, pooled_votes
from workbench.cache.streaming import StreamingPolicy
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.models.attention import attention
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import varied_model

KV_HEADS, DIM = 2, 8


def layer_cache(cls=DenseLayerCache, **extra) -> DenseLayerCache:
    return cls(KV_HEADS, DIM, torch.float32, torch.device("cpu"), 8, **extra)


def key_of(positions: torch.Tensor) -> torch.Tensor:
    """Keys that name their position: [kv_heads, n, DIM] with channel 7 = position, channel 6 = head."""
    k = torch.zeros(KV_HEADS, positions.shape[-1], DIM)
    k[..., 7] = positions.float()
    k[..., 6] = torch.arange(KV_HEADS)[:, None].float()
    return k


def forward(layer, q, k, start: int, mask=None):
    """What a model layer does: append k (= v) at positions start.., attend (observers see the queries).

    q: [heads, T, DIM]; k: [kv_heads, T, DIM]."""
    positions = torch.arange(start, start + q.shape[1])
    return attention(q.transpose(0, 1), k.transpose(0, 1), k.transpose(0, 1), positions, layer, mask)


def test_kept_count_is_the_budget_share_rounded_up():
    assert [kept_count(n, 0.5) for n in (1, 9, 10)] == [1, 5, 5]
    assert kept_count(10, 0.3) == 3  # 0.3 * 10 is 3.0000000000000004 in floating point
    assert kept_count(10, 1.0) == 10 and kept_count(1000, 0.0001) == 1


@pytest.mark.parametrize("name", ["ems", "prefix_kv", "double_sparsity"])
@pytest.mark.parametrize("budget", [0.0, 1.5])
def test_a_fractional_budget_outside_0_1_is_refused(name, budget):
    with pytest.raises(SpecError, match="budget"):
        RunSpec(cache=[TechniqueSpec(name, {"budget": budget})]).validated()


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv"])
def test_a_fraction_above_1_is_refused(name):
    with pytest.raises(SpecError, match="fraction"):
        RunSpec(cache=[TechniqueSpec(name, {"fraction": 1.5})]).validated()


@pytest.mark.parametrize(("name", "params", "message"), [
    ("h2o", {"budget": 0.5}, "budget='?0.5'? is not a valid int"),  # the old fraction form: now `fraction`
    ("h2o", {"budget": 0}, "out of range"),
    ("snapkv", {"budget": 0}, "out of range"),
    ("snapkv", {"budget": 32, "window": 64}, "smaller than window=64"),
    ("streaming", {"sinks": 0, "window": 0}, "keep no token"),
])
def test_absolute_budgets_refuse_what_cannot_work(name, params, message):
    with pytest.raises(SpecError, match=message):
        RunSpec(cache=[TechniqueSpec(name, params)]).validated()


def test_absolute_budgets_are_the_defaults_and_a_fraction_is_one_parameter_away():
    streaming, h2o, snapkv = StreamingPolicy(), H2OPolicy(), SnapKVPolicy()
    assert (streaming.sinks, streaming.window, h2o.budget, snapkv.budget) == (4, 1020, 1024, 1024)
    assert streaming.kept(5000) == h2o.kept(5000) == 1024 and streaming.kept(100) == 100
    assert StreamingPolicy(fraction=0.5).kept(5000) == H2OPolicy(fraction=0.5).kept(5000) == 2500
    assert kept_tokens(5000, 1024, 0.0) == 1024 and kept_tokens(5000, 1024, 0.25) == 1250


def test_snapkv_refuses_an_even_kernel():
    with pytest.raises(SpecError, match="odd"):
        RunSpec(cache=[TechniqueSpec("snapkv", {"kernel": 4})]).validated()


def test_select_keeps_sinks_recent_and_the_top_scored_per_head():
    scores = torch.tensor([[9.0, 0, 5, 1, 0, 0, 3, 0], [9.0, 0, 1, 0, 7, 2, 0, 0]])
    assert select(scores, 5, sinks=1, recent=2).tolist() == [[0, 2, 3, 6, 7], [0, 4, 5, 6, 7]]


def test_streaming_keeps_the_sinks_and_the_recent_window_while_decoding():
    layer = layer_cache()
    layer.append(key_of(torch.arange(20).expand(KV_HEADS, -1)), torch.zeros(KV_HEADS, 20, DIM), torch.arange(20))
    layer.commit()
    policy, cache = StreamingPolicy(fraction=0.5, sinks=2), KVCache([layer])
    policy.on_prefill_end(cache)
    assert layer.positions.tolist() == [[0, 1, *range(12, 20)]] * KV_HEADS
    layer.append(key_of(torch.tensor([20]).expand(KV_HEADS, -1)), torch.zeros(KV_HEADS, 1, DIM), torch.tensor([20]))
    layer.commit()
    policy.on_step_end(cache)  # 21 tokens seen: 11 kept
    assert layer.positions.tolist() == [[0, 1, *range(12, 21)]] * KV_HEADS
    assert torch.equal(layer.view()[0], key_of(layer.positions))  # each kept key is still its own token's


def spiky_prompt(n: int = 16, hitters=(3, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    """q [KV_HEADS, n, DIM], k [KV_HEADS, n, DIM]: every query of head h attends to token hitters[h] (once it
    can see it); every other key is orthogonal to the queries."""
    k = torch.zeros(KV_HEADS, n, DIM)
    k[:, :, 1] = 1.0
    for head, token in enumerate(hitters):
        k[head, token, 0] = 20.0
    q = torch.zeros(KV_HEADS, n, DIM)
    q[:, :, 0] = 1.0
    return q, k


def test_streaming_holds_sinks_plus_window_however_long_the_context():
    layer = layer_cache()
    layer.append(key_of(torch.arange(20).expand(KV_HEADS, -1)), torch.zeros(KV_HEADS, 20, DIM), torch.arange(20))
    layer.commit()
    policy, cache = StreamingPolicy(sinks=2, window=6), KVCache([layer])
    policy.on_prefill_end(cache)
    assert layer.positions.tolist() == [[0, 1, *range(14, 20)]] * KV_HEADS
    for pos in range(20, 30):
        layer.append(key_of(torch.tensor([pos]).expand(KV_HEADS, -1)), torch.zeros(KV_HEADS, 1, DIM),
                     torch.tensor([pos]))
        layer.commit()
        policy.on_step_end(cache)
    assert layer.positions.tolist() == [[0, 1, *range(24, 30)]] * KV_HEADS
    assert torch.equal(layer.view()[0], key_of(layer.positions))


def test_h2o_keeps_each_heads_heavy_hitters_and_the_recent_tokens():
    layer = layer_cache()
    policy = H2OPolicy(fraction=0.25, recent=0.5)  # 16 tokens -> 4: 2 recent + 2 heavy hitters per head
    policy.on_cache_built(KVCache([layer]))
    q, k = spiky_prompt()
    forward(layer, q, k, 0)
    layer.commit()
    policy.on_prefill_end(KVCache([layer]))
    # token 0 is the runner-up in both heads: the causal mask gives early tokens the early queries' attention
    assert layer.positions.tolist() == [[0, 3, 14, 15], [0, 7, 14, 15]]
    assert torch.equal(layer.view()[0][0, 1], k[0, 3]) and torch.equal(layer.view()[0][1, 1], k[1, 7])


def test_the_observer_counts_only_the_committed_queries_of_a_draft_tree():
    q, k = spiky_prompt(12)
    tree_q, tree_k = torch.randn(KV_HEADS, 3, DIM), torch.randn(KV_HEADS, 3, DIM)
    # root (offset 0) with two children (offsets 1 and 2); the engine keeps the root and the second child
    tree_mask = torch.tensor([[True, False, False], [True, True, False], [True, False, True]])
    tree, chain = layer_cache(), layer_cache()
    for layer in (tree, chain):
        layer.observer = AccumulatedAttention()
        forward(layer, q, k, 0)
        layer.commit()
    forward(tree, torch.randn(KV_HEADS, 2, DIM), torch.randn(KV_HEADS, 2, DIM), 12)
    tree.rollback()  # a self-speculative draft's scratch: never counted
    forward(tree, tree_q, tree_k, 12, tree_mask)
    tree.commit([0, 2])
    forward(chain, tree_q[:, [0, 2]], tree_k[:, [0, 2]], 12)
    chain.commit()
    assert torch.allclose(tree.observer.scores, chain.observer.scores, atol=1e-6)
    assert torch.equal(tree.observer.seen, chain.observer.seen)
    assert tree.observer.seen[0, -2:].tolist() == [2, 1]  # the root is seen by itself and its kept child only


def test_h2o_scores_after_speculative_decoding_equal_plain_decodings():
    """End to end: the drafts a draft model proposes and the target rejects leave no trace in the scores."""
    model = varied_model("llama")
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6]
    runs = {}
    for decode in ("plain", "draft_model"):
        engine = Engine(model, RunSpec(max_new_tokens=16, cache=[TechniqueSpec("h2o", {"fraction": 1.0})],
                                       decode=TechniqueSpec(decode, {"layers": 2} if decode != "plain" else {})))
        steps = list(engine.run(prompt))
        rejected = sum(s.n_drafted - s.n_accepted for s in steps)
        runs[decode] = ([t for s in steps for t in s.tokens], engine.policies[0]._scores, rejected)
    assert runs["plain"][0] == runs["draft_model"][0]
    assert runs["draft_model"][2] > 0  # the target rejected some drafts
    for plain, spec in zip(runs["plain"][1], runs["draft_model"][1]):
        assert torch.allclose(plain.scores, spec.scores, atol=1e-4)


def test_snapkv_keeps_the_window_and_the_tokens_it_votes_for_per_head():
    layer = layer_cache()
    policy = SnapKVPolicy(fraction=0.375, window=4, kernel=1)  # 16 tokens -> 6: the window + 2 voted per head
    policy.on_cache_built(KVCache([layer]))
    q, k = spiky_prompt(hitters=(3, 7))
    q[:, :12] = torch.randn(KV_HEADS, 12, DIM)  # only the window's queries vote: these must not matter
    k[1, 9, 0] = 10.0  # head 1's runner-up
    k[0, 5, 0] = 10.0  # head 0's runner-up
    forward(layer, q, k, 0)
    layer.commit()
    policy.on_prefill_end(KVCache([layer]))
    assert layer.positions.tolist() == [[3, 5, 12, 13, 14, 15], [7, 9, 12, 13, 14, 15]]
    assert layer.observer is None  # decoding is not observed after the prefill


def test_snapkv_pooling_spreads_a_vote_to_its_neighbours_but_not_into_the_window():
    votes = torch.tensor([[0.0, 0, 3, 0, 0, 0, 9, 9]])
    assert torch.allclose(pooled_votes(votes, 2, 3, "avg"), torch.tensor([[0.0, 1, 1, 1, 0, 0, 9, 9]]))
    assert torch.equal(pooled_votes(votes, 2, 3, "max"), torch.tensor([[0.0, 3, 3, 3, 0, 0, 9, 9]]))


def test_ems_merges_similar_evicted_tokens_and_drops_the_zero_class():
    layer = layer_cache()
    e = torch.eye(DIM)
    keys = torch.stack([e[0], e[0] * 2, e[1], -e[0], e[1], e[2]])  # token 1 points like token 0; 3, 2, 4 do not
    layer.append(keys.expand(KV_HEADS, -1, -1).clone(), torch.arange(6.0)[None, :, None].expand(KV_HEADS, -1, DIM),
                 torch.arange(6))
    layer.commit()
    score = torch.tensor([[4.0, 1, 0.5, 0.5, 0.5, 0]] * KV_HEADS)  # token 0 best; token 5 is the window
    EMSPolicy(budget=1 / 3, merge=1.0, threshold=0.5)._compress(layer, score, keep=2, window=1)
    k, v = layer.view()
    assert layer.positions.tolist() == [[0, 5]] * KV_HEADS
    assert torch.allclose(v[:, 0], torch.full((KV_HEADS, DIM), (4 * 0 + 1 * 1) / 5))  # merged with token 1
    assert torch.allclose(k[:, 0, 0], torch.full((KV_HEADS,), (4 * 1 + 1 * 2) / 5))
    assert torch.equal(v[:, 1], torch.full((KV_HEADS, DIM), 5.0))  # nothing joined the window token


def test_prefix_kv_gives_concentrated_layers_fewer_tokens_and_spends_the_budget_exactly():
    concentrated = torch.tensor([[10.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    flat = torch.ones(1, 8)
    curves = [prefix_curve(concentrated), prefix_curve(flat)]
    kept = layer_budgets(curves, 8)
    assert sum(kept) == 8 and kept[0] < kept[1]
    generator = torch.Generator().manual_seed(0)
    for total in range(3, 24):
        curves = [prefix_curve(torch.rand(2, 8, generator=generator) ** 4) for _ in range(3)]
        assert sum(layer_budgets(curves, total)) == total


def test_prefix_kv_evicts_layers_to_different_lengths():
    layers = [layer_cache(), layer_cache()]
    policy = PrefixKVPolicy(budget=0.25, window=1)
    policy.on_cache_built(KVCache(layers))
    q, k = spiky_prompt()
    forward(layers[0], q, k, 0)  # attention on one token per head
    forward(layers[1], q, torch.randn(KV_HEADS, 16, DIM) * 0.01, 0)  # nearly uniform attention
    for layer in layers:
        layer.commit()
    policy.on_prefill_end(KVCache(layers))
    assert layers[0].length + layers[1].length == 8 and layers[0].length < layers[1].length
    for layer in layers:
        assert int(layer.positions[0, -1]) == 15  # the window


def test_double_sparsity_calibrates_the_outlier_channels():
    q, k = torch.ones(4, 5, DIM), torch.ones(KV_HEADS, 5, DIM)
    q[:2, :, 3] = 50.0  # kv head 0's queries (heads 0 and 1) are big on channel 3
    k[1, :, 6] = 50.0  # kv head 1's keys are big on channel 6
    assert outlier_channels(q, k, 1).tolist() == [[3], [6]]


def test_double_sparsity_attends_exactly_to_the_top_tokens_of_the_approximate_scores():
    torch.manual_seed(0)
    layer = layer_cache(DoubleSparsityLayerCache, n_channels=2, budget=0.25)
    heads, n = 4, 16
    prompt_q, k, v = torch.randn(heads, n, DIM), torch.randn(KV_HEADS, n + 1, DIM), torch.randn(KV_HEADS, n + 1, DIM)
    layer.append(k[:, :n], v[:, :n], torch.arange(n))
    layer.attend(prompt_q, None)  # the prompt: calibrates
    layer.commit()
    q = torch.randn(heads, 1, DIM)
    layer.append(k[:, n:], v[:, n:], torch.tensor([n]))
    out = layer.attend(q, torch.ones(1, n + 1, dtype=torch.bool))
    # reference: the top kept_count(17, 0.25) = 5 keys per query head by the channels' partial dot products
    kv_of = torch.arange(heads) // 2
    approx = torch.stack([q[h, 0, layer.channels[kv_of[h]]] @ k[kv_of[h]][:, layer.channels[kv_of[h]]].T
                          for h in range(heads)])
    chosen = approx.topk(5).indices
    expected = torch.stack([torch.softmax(k[kv_of[h], chosen[h]] @ q[h, 0] / DIM**0.5, 0) @ v[kv_of[h], chosen[h]]
                            for h in range(heads)])
    assert torch.allclose(out[:, 0], expected, atol=1e-5)
    dense = DenseLayerCache(KV_HEADS, DIM, torch.float32, torch.device("cpu"), 8)
    dense.append(k, v, torch.arange(n + 1))
    assert layer.nbytes() == dense.nbytes() + KV_HEADS * 2 * 8  # dense bytes plus the int64 channel index


@pytest.mark.parametrize("policy", [StreamingPolicy(fraction=0.5), H2OPolicy(fraction=0.5), SnapKVPolicy(fraction=0.5),
                                    PrefixKVPolicy(budget=0.5)])
def test_every_kept_key_is_still_its_own_tokens_and_new_tokens_land_after(policy):
    layer = layer_cache()
    cache = KVCache([layer])
    policy.on_cache_built(cache)
    q = torch.randn(4, 12, DIM)
    forward(layer, q, key_of(torch.arange(12).expand(KV_HEADS, -1)), 0)
    layer.commit()
    policy.on_prefill_end(cache)
    for step in range(12, 16):
        forward(layer, torch.randn(4, 1, DIM), key_of(torch.tensor([[step]] * KV_HEADS)), step)
        layer.commit()
        policy.on_step_end(cache)
        assert torch.equal(layer.view()[0], key_of(layer.positions))
        assert layer.positions[:, -1].tolist() == [step] * KV_HEADS


def test_two_scoring_policies_share_a_layer():
    layer = layer_cache()
    first, second = AccumulatedAttention(), AccumulatedAttention()
    attach(layer, first)
    attach(layer, second)
    q, k = spiky_prompt(6, hitters=(1, 2))
    forward(layer, q, k, 0)
    layer.commit()
    assert first.scores is not None and torch.equal(first.scores, second.scores)


def test_a_long_prompt_is_summed_in_blocks_to_the_same_scores(monkeypatch):
    from workbench.cache import scores

    torch.manual_seed(1)
    n = scores.PER_QUERY_LIMIT + 44  # more queries than are kept one by one; more than one block of rows
    q, k = torch.randn(4, n, DIM), torch.randn(KV_HEADS, n, DIM)
    summed = layer_cache()
    summed.observer = AccumulatedAttention()
    forward(summed, q, k, 0)
    summed.commit()
    monkeypatch.setattr(scores, "PER_QUERY_LIMIT", 10 * n)
    per_query = layer_cache()
    per_query.observer = AccumulatedAttention()
    forward(per_query, q, k, 0)
    per_query.commit()
    assert torch.allclose(summed.observer.scores, per_query.observer.scores, atol=1e-4)
    assert torch.equal(summed.observer.seen, per_query.observer.seen)
    assert summed.observer.seen[0, :3].tolist() == [n, n - 1, n - 2]
    assert torch.allclose(summed.observer.scores.sum(1), torch.full((KV_HEADS,), 2.0 * n))  # 2 query heads each


def test_a_long_forward_committed_in_part_is_refused():
    layer = layer_cache()
    layer.observer = AccumulatedAttention()
    n = 300
    forward(layer, torch.randn(4, n, DIM), torch.randn(KV_HEADS, n, DIM), 0)
    with pytest.raises(RuntimeError, match="committed whole"):
        layer.commit([0, 2])
