"""The dense layer cache: append, view, keep, commit, rollback, positions and bytes."""

import torch

from workbench.cache.dense import DenseLayerCache
from workbench.decoding.base import DraftTree


def filled(n, capacity=4):
    cache = DenseLayerCache(kv_heads=2, head_dim=3, dtype=torch.float32, device=torch.device("cpu"),
                            capacity=capacity)
    k = torch.arange(2 * n * 3, dtype=torch.float32).view(2, n, 3)
    cache.append(k, -k, torch.arange(n) + 100)
    return cache, k


def test_append_grows_past_capacity_and_views_everything():
    cache, k = filled(10, capacity=4)
    keys, values = cache.view()
    assert torch.equal(keys, k) and torch.equal(values, -k)
    assert cache.positions.tolist() == [list(range(100, 110))] * 2


def test_commit_keeps_chosen_new_tokens_in_order():
    cache, k = filled(4)
    cache.commit()
    new = torch.full((2, 3, 3), 7.0)
    new[:, 1] = 8.0
    new[:, 2] = 9.0
    cache.append(new, new, torch.tensor([104, 105, 105]))
    cache.commit([0, 2])  # keep the root and the second branch
    keys, _ = cache.view()
    assert cache.length == cache.n_committed == 6
    assert torch.equal(keys[:, :4], k)
    assert keys[0, 4, 0] == 7 and keys[0, 5, 0] == 9
    assert cache.positions[0].tolist() == [100, 101, 102, 103, 104, 105]


def test_commit_of_a_tree_path_moves_only_what_the_gather_would():
    for offsets in ([0, 2], [0, 1, 3, 5], [1, 4], [0, 2, 3, 4]):
        fast, _ = filled(5)
        fast.commit()
        new = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3) + 1000
        fast.append(new, -new, torch.tensor([105, 106, 106, 107, 107, 108]))
        slots = torch.tensor(list(range(5)) + [5 + o for o in offsets])
        expected_k, expected_v = (t[:, slots].clone() for t in fast.view())
        expected_pos = fast.positions[:, slots].clone()
        fast.commit(offsets)
        keys, values = fast.view()
        assert fast.length == fast.n_committed == 5 + len(offsets)
        assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
        assert torch.equal(fast.positions, expected_pos)


def test_rollback_drops_uncommitted_tokens():
    cache, _ = filled(5)
    cache.commit()
    cache.append(torch.zeros(2, 2, 3), torch.zeros(2, 2, 3), torch.tensor([105, 106]))
    cache.rollback()
    assert cache.length == 5


def test_keep_evicts_while_positions_survive():
    cache, k = filled(6)
    cache.commit()
    cache.keep(torch.tensor([0, 3, 5]))
    keys, _ = cache.view()
    assert torch.equal(keys, k[:, [0, 3, 5]])
    assert cache.positions.tolist() == [[100, 103, 105]] * 2


def test_nbytes_counts_held_tokens_per_head():
    cache, _ = filled(6)
    per_head = 2 * 6 * 3 * 4 + 6 * 8  # k and v in float32, plus each head's positions
    assert cache.nbytes_per_head().tolist() == [per_head, per_head]
    assert cache.nbytes() == 2 * per_head


def test_per_head_keep_selects_different_tokens_in_each_head():
    cache, k = filled(5)
    cache.commit()
    cache.keep(torch.tensor([[0, 2, 4], [1, 3, 4]]))
    keys, values = cache.view()
    assert cache.length == cache.n_committed == 3
    assert torch.equal(keys[0], k[0, [0, 2, 4]]) and torch.equal(keys[1], k[1, [1, 3, 4]])
    assert torch.equal(values, -keys)
    assert cache.positions.tolist() == [[100, 102, 104], [101, 103, 104]]
    cache.append(k[:, :1], k[:, :1], torch.tensor([105]))  # new tokens land after each head's kept ones
    assert cache.positions[:, -1].tolist() == [105, 105]


def test_tree_mask_and_positions():
    #      root
    #     /    \
    #    0      1
    #    |
    #    2
    tree = DraftTree([10, 11, 12], [-1, -1, 0])
    mask = tree.attention_mask()
    assert mask.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, False, True, False],
        [True, True, False, True],
    ]
    assert tree.positions(50).tolist() == [50, 51, 51, 52]
    assert tree.children() == {-1: [0, 1], 0: [2], 1: [], 2: []}
    assert not tree.is_chain() and DraftTree.chain([1, 2, 3]).is_chain()


def test_model_cache_reports_bytes_per_layer_and_head():
    from workbench.cache.base import KVCache

    layers = [filled(n)[0] for n in (3, 5)]  # layers may hold different numbers of tokens
    cache = KVCache(layers)
    per = cache.nbytes_per_layer_head()
    assert per.shape == (2, 2)
    assert per[1, 0] * 3 == per[0, 0] * 5
    assert int(per.sum()) == cache.nbytes() == layers[0].nbytes() + layers[1].nbytes()
    assert cache.tokens_per_layer() == [3, 5]


def test_keep_first_cuts_every_layer_to_committed_tokens():
    from workbench.cache.base import KVCache

    layers = [filled(n)[0] for n in (6, 3)]
    cache = KVCache(layers)
    cache.commit()
    cache.keep_first(4)
    assert cache.tokens_per_layer() == [4, 3]
    assert all(layer.n_committed == layer.length for layer in layers)
    assert layers[0].positions[1].tolist() == [100, 101, 102, 103]
