"""Mustafar (arXiv 2505.22913): the bitmap form round-trips exactly to per-token, per-head magnitude pruning,
and the dense window slides as in the paper (the `residual` most recent committed tokens always dense, the
prompt pruned except its last `residual` tokens, drafts raw until accepted)."""

import pytest
import torch

from workbench.cache.mustafar import MustafarCodec, MustafarLayerCache
from workbench.models.attention import _grouped_attention

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
H, D = 3, 64


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, n, D, generator=g), torch.randn(H, n, D, generator=g)


def pruned(x, sparsity):
    """The paper's rule, written independently: zero each token's (per head) round(sparsity * D) smallest
    magnitudes over its head_dim channels."""
    drop = round(D * sparsity)
    out = x.clone()
    if drop:
        out.scatter_(-1, x.abs().argsort(dim=-1)[..., :drop], 0.0)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7])
def test_the_bitmap_form_round_trips_to_exactly_the_pruned_vectors(sparsity, dtype):
    k, v = (t.to(dtype) for t in data(40))
    codec = MustafarCodec(D, sparsity, dtype)
    tok, grp = codec.encode(k[:, :, None], v[:, :, None])  # groups of one token
    assert tok["k_bitmap"].shape == (H, 40, D // 8) and tok["k_bitmap"].dtype == torch.uint8
    assert tok["k_values"].shape == (H, 40, D - round(D * sparsity)) and tok["v_values"].dtype == dtype
    kept = D - round(D * sparsity)
    for x, y in zip((k, v), codec.decode(tok, grp), strict=True):
        x = x.float()
        if dtype == torch.float32:  # no ties: exactly the independent rule
            assert torch.equal(y, pruned(x, sparsity))
        held = y != 0  # (the data has no zeros)
        assert (held.sum(-1) == kept).all() and torch.equal(y[held], x[held])  # kept entries bit for bit
        # bf16 has ties in magnitude; any of them may be kept, but never a smaller one over a larger one
        smallest_kept = x.abs().masked_fill(~held, float("inf")).amin(-1)
        largest_dropped = x.abs().masked_fill(held, -1.0).amax(-1)
        assert (smallest_kept >= largest_dropped).all()
    assert codec.held_fraction() == kept / D


def test_each_head_of_each_token_is_pruned_on_its_own():
    k, v = data(8)
    k[1] *= 100  # a loud head must not take another head's budget
    k[:, 3] *= 0.01  # nor a loud token another token's
    dk, _ = MustafarCodec(D, 0.5, torch.float32).decode(*MustafarCodec(D, 0.5, torch.float32).encode(
        k[:, :, None], v[:, :, None]))
    assert ((dk != 0).sum(-1) == D // 2).all()


def commit(cache, k, v, start, stop):
    cache.append(k[:, start:stop], v[:, start:stop], torch.arange(start, stop).expand(H, -1))
    cache.commit()


@pytest.mark.parametrize("window", [0, 1, 8])
def test_the_dense_window_slides_one_token_per_step(window):
    k, v = data(30)
    cache = MustafarLayerCache(MustafarCodec(D, 0.5, torch.float32), H, D, torch.float32, CPU, 16, window)
    commit(cache, k, v, 0, 20)  # the prompt: all but its last `window` tokens pruned at once
    for n in range(20, 31):
        dense = min(window, n)
        assert cache.n_compressed == n - dense and cache.raw.n_committed == cache.raw.length == dense
        ck, cv = cache.view()
        assert torch.equal(ck[:, n - dense:], k[:, n - dense:n]) and torch.equal(cv[:, n - dense:], v[:, n - dense:n])
        assert torch.equal(ck[:, :n - dense], pruned(k[:, :n - dense], 0.5))
        assert torch.equal(cv[:, :n - dense], pruned(v[:, :n - dense], 0.5))
        assert cache.positions.tolist() == [list(range(n))] * H
        if n < 30:
            commit(cache, k, v, n, n + 1)  # a decoding step


def test_drafts_stay_raw_and_only_accepted_tokens_move_the_window():
    k, v = data(30)
    cache = MustafarLayerCache(MustafarCodec(D, 0.5, torch.float32), H, D, torch.float32, CPU, 16, 4)
    commit(cache, k, v, 0, 20)
    cache.append(k[:, 20:24], v[:, 20:24], torch.tensor([20, 21, 21, 22]).expand(H, -1))  # a tree of drafts
    assert cache.n_compressed == 16 and cache.raw.length == 8
    q = torch.randn(2 * H, 4, D, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, cache.length, dtype=torch.bool)
    mask[0, -3:] = False
    pk, pv = cache.view()
    assert torch.equal(pk[:, 16:], k[:, 16:24])  # window and drafts exact
    assert torch.allclose(cache.attend(q, mask), _grouped_attention(q, pk, pv, mask), atol=1e-5)
    cache.commit([0, 2])  # two accepted: the two oldest window tokens leave it, pruned
    assert cache.n_compressed == 18 and cache.raw.n_committed == cache.raw.length == 4
    ck = cache.view()[0]
    assert torch.equal(ck[:, :18], pruned(k[:, :18], 0.5))
    assert torch.equal(ck[:, 18:], torch.cat([k[:, 18:21], k[:, 22:23]], dim=1))
    assert cache.positions[0].tolist() == list(range(22))


def test_bytes_are_the_bitmap_the_nonzeros_and_the_dense_window():
    k, v = data(50)
    cache = MustafarLayerCache(MustafarCodec(D, 0.5, torch.bfloat16), H, D, torch.bfloat16, CPU, 16, 8)
    commit(cache, k.bfloat16(), v.bfloat16(), 0, 50)
    per_token = 2 * (D // 8) + 2 * (D // 2) * 2  # K and V: bitmap bits, bf16 nonzeros
    dense_token = 2 * D * 2 + 8  # K and V in bf16 and an int64 position
    assert cache.nbytes_per_head().tolist() == [42 * per_token + 8 * dense_token] * H
