"""Compressed KV storage forms (kivi, gear, mustafar, block_fp): round trips, real bytes, the cache contract
(commit, rollback, tree offsets, 1-D and per-head keep), compressed attention, and decoding with drafters."""

import pytest
import torch

from workbench.cache.block_fp import BlockFPCodec
from workbench.cache.dense import DenseLayerCache
from workbench.cache.gear import GearCodec
from workbench.cache.kivi import KiviCodec
from workbench.cache.mustafar import MustafarCodec, MustafarLayerCache
from workbench.cache.quantized import CompressedLayerCache
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.models.attention import _grouped_attention
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
H, D = 3, 64


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(H, n, D, generator=g), torch.randn(H, n, D, generator=g)
    k[:, :, 5] *= 8  # a key outlier channel, as real keys have
    return k, v


def filled(codec, n=70, residual=0, cls=CompressedLayerCache, dtype=torch.float32):
    cache = cls(codec, H, D, dtype, CPU, 16, residual)
    k, v = data(n)
    cache.append(k.to(dtype), v.to(dtype), torch.arange(n).expand(H, -1))
    cache.commit()
    return cache, k, v


def codecs():
    return {"kivi4": KiviCodec(4, 16, 32), "kivi2": KiviCodec(2, 16, 32), "gear": GearCodec(2, 16, 4, 0.02, D),
            "block_fp": BlockFPCodec(8, 32, True), "mustafar": MustafarCodec(D, 0.5, torch.float32)}


def error(codec, residual=0):
    cache, k, v = filled(codec, residual=residual)
    ck, cv = cache.view()
    return float((ck - k).norm() / k.norm()), float((cv - v).norm() / v.norm())


def test_round_trip_errors_are_bounded_and_ordered():
    e4, e2 = error(KiviCodec(4, 16, 32)), error(KiviCodec(2, 16, 32))
    assert max(e4) < 0.12 and max(e2) < 0.5
    assert e4[0] < e2[0] / 3 and e4[1] < e2[1] / 3  # 4 bits: much better than 2
    # GEAR's outliers and low-rank error term improve its own 2-bit backbone
    plain, full = error(GearCodec(2, 16, 0, 0.0, D)), error(GearCodec(2, 16, 4, 0.04, D))
    assert full[0] < plain[0] * 0.8 and full[1] < plain[1] * 0.9
    assert max(error(BlockFPCodec(8, 32, False))) < 0.02 < max(error(BlockFPCodec(4, 32, False)))


def test_residual_window_stays_exact_and_everything_else_is_compressed():
    cache, k, v = filled(KiviCodec(2, 16, 32), n=70, residual=32)
    assert cache.n_compressed == 64 and cache.raw.length == 6  # window filled past 32: whole groups flushed
    ck, cv = cache.view()
    assert torch.equal(ck[:, 64:], k[:, 64:]) and not torch.equal(ck[:, :64], k[:, :64])
    assert cache.positions.tolist() == [list(range(70))] * H


def test_block_rearrangement_puts_outlier_channels_in_one_block():
    k, v = data(64)
    k[:, :, [5, 40]] += 20  # two outlier channels (large in every token) in different blocks
    errs = []
    for reorder in (False, True):
        cache = CompressedLayerCache(BlockFPCodec(4, 32, reorder), H, D, torch.float32, CPU, 8, 0)
        cache.append(k, v, torch.arange(64).expand(H, -1))
        cache.commit()
        errs.append(float((cache.view()[0] - k).norm()))
    assert errs[1] < errs[0] * 0.9


def test_mustafar_prunes_each_token_to_its_largest_entries():
    cache, k, _ = filled(MustafarCodec(D, 0.5, torch.float32))
    ck = cache.view()[0]
    assert ((ck != 0).sum(-1) == D // 2).all()
    top = k.abs().topk(D // 2, dim=-1).indices
    assert torch.equal(ck.gather(-1, top), k.gather(-1, top))


def test_bytes_are_real_and_match_the_formulas():
    n, g = 64, 16
    for bits in (2, 4):
        cache, _, _ = filled(KiviCodec(bits, g, 32), n=n)
        codes = 2 * n * D * bits // 8
        key_scales = 2 * (n // g) * D * 2  # scale and min, float16, per channel per group
        value_scales = 2 * n * (D // 32) * 2  # scale and min, float16, per token per channel group
        # consecutive positions, the same in every head: implicit, nothing held for them
        assert cache.nbytes_per_head().tolist() == [codes + key_scales + value_scales] * H
        before = cache.nbytes()
        cache.keep(torch.arange(0, n, 2))  # now positions (int32) and group indices (int16) are held, once
        half = (codes + value_scales) // 2 + key_scales  # per-token fields halve; every group keeps its scales
        held = half + (n // 2) * 4 // H + (n // 2) * 2 // H  # positions and group indices, shared by the heads
        assert cache.nbytes_per_head().tolist() == [held] * H and cache.nbytes() < before
    cache, _, _ = filled(MustafarCodec(D, 0.5, torch.float32), n=n)
    bitmaps, values = 2 * n * D // 8, 2 * n * (D // 2) * 4
    assert cache.nbytes_per_head().tolist() == [bitmaps + values] * H
    cache, _, _ = filled(BlockFPCodec(8, 32, True), n=n)
    assert cache.nbytes_per_head().tolist() == [2 * n * D + 2 * n * 2 + 2 * D * 2] * H  # codes, exponents, perms


@pytest.mark.parametrize("name,bits,bar", [("kivi", 4, 0.30), ("kivi", 2, 0.20), ("mustafar", 0, 0.70)])
def test_byte_bars_at_2k_hold_with_the_default_parameters(name, bits, bar):
    # SmolLM2-135M's shape (3 kv heads of 64 channels, bfloat16); the residual window is worst when fullest.
    from workbench.cache.kivi import KiviPolicy
    from workbench.cache.mustafar import MustafarPolicy

    policy = KiviPolicy(bits=bits) if name == "kivi" else MustafarPolicy(sparsity=0.5)
    codec = KiviCodec(bits, policy.group, policy.channels) if name == "kivi" else \
        MustafarCodec(D, 0.5, torch.bfloat16)
    cls = MustafarLayerCache if name == "mustafar" else CompressedLayerCache
    for n in (2047, 2048):  # 2047 = 31 whole groups + 63 raw: kivi's fullest window near 2k
        cache = cls(codec, H, D, torch.bfloat16, CPU, n, policy.residual)
        dense = DenseLayerCache(H, D, torch.bfloat16, CPU, n)
        k, v = data(n)
        for c in (cache, dense):
            c.append(k.bfloat16(), v.bfloat16(), torch.arange(n).expand(H, -1))
            c.commit()
        assert cache.nbytes() <= bar * dense.nbytes(), (n, cache.nbytes() / dense.nbytes())


@pytest.mark.parametrize("name", list(codecs()))
def test_commit_rollback_tree_offsets_and_keep_never_reencode(name):
    codec = codecs()[name]
    cls = MustafarLayerCache if name == "mustafar" else CompressedLayerCache
    # kivi/gear encode whole groups of 16 (32 of 40 tokens); block_fp flushes a full window of 10 raw tokens,
    # mustafar's window slides (its 10 most recent stay raw)
    cache, _, _ = filled(codec, n=40, residual=10 if codec.group == 1 else 0, cls=cls)
    assert cache.n_compressed == {"mustafar": 30, "block_fp": 40}.get(name, 32)
    before_k, before_v = cache.view()
    new = torch.arange(4 * H * D, dtype=torch.float32).view(H, 4, D)
    cache.append(new, -new, torch.tensor([40, 41, 41, 42]).expand(H, -1))
    cache.rollback()
    assert cache.length == 40 and torch.equal(cache.view()[0], before_k)
    cache.append(new, -new, torch.tensor([40, 41, 41, 42]).expand(H, -1))
    cache.commit([0, 2])  # a tree: the root and the second branch
    assert cache.n_committed == cache.length == 42
    assert cache.positions[0, -2:].tolist() == [40, 41] and torch.equal(cache.view()[0][:, 41], new[:, 2])
    k_all, v_all = cache.view()
    slots = torch.tensor([0, 3, 17, 20, 33, 40, 41])
    cache.keep(slots)  # 1-D: the same tokens in every head
    assert torch.equal(cache.view()[0], k_all[:, slots]) and torch.equal(cache.view()[1], v_all[:, slots])
    assert cache.positions[0].tolist() == [0, 3, 17, 20, 33, 40, 40 + 1]
    k_all, pos = cache.view()[0], cache.positions
    per_head = torch.tensor([[0, 1, 2, 5], [1, 3, 4, 6], [0, 2, 3, 4]])
    cache.keep(per_head)  # per head: different tokens, and a different number of them compressed
    assert torch.equal(cache.view()[0], k_all.gather(1, per_head[:, :, None].expand(-1, -1, D)))
    assert torch.equal(cache.positions, pos.gather(1, per_head))
    assert cache.n_committed == cache.length == 4 and (cache.nbytes_per_head() > 0).all()
    assert before_v.shape[1] == 40


def append_a_draft_tree(cache, k, v, n: int = 50):
    """Three raw draft tokens after `n` committed ones, and queries with a tree mask over everything held."""
    cache.append(k[:, :3], v[:, :3], torch.arange(n, n + 3).expand(H, -1))  # drafts: raw
    q = torch.randn(2 * H, 3, D, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, cache.length, dtype=torch.bool)
    mask[0, -2:] = False
    mask[1, -1] = False
    return q, mask


def test_mustafar_compressed_attention_equals_dense_attention_over_the_pruned_cache():
    cache, k, v = filled(MustafarCodec(D, 0.5, torch.float32), n=50, residual=8, cls=MustafarLayerCache)
    q, mask = append_a_draft_tree(cache, k, v)
    pk, pv = cache.view()
    assert torch.allclose(cache.attend(q, mask), _grouped_attention(q, pk, pv, mask), atol=1e-5)
    fresh = MustafarLayerCache(cache.codec, H, D, torch.float32, CPU, 8, 0)
    fresh.append(k[:, :5], v[:, :5], torch.arange(5).expand(H, -1))  # a causal prompt: mask None
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    out = fresh.attend(torch.randn(2 * H, 5, D), None)
    assert out.shape == (2 * H, 5, D)
    q5 = torch.randn(2 * H, 5, D)
    assert torch.allclose(fresh.attend(q5, None), _grouped_attention(q5, k[:, :5], v[:, :5], causal), atol=1e-5)


# --- decoding ---------------------------------------------------------------------------------------------
PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6] + list(range(40, 60))
DRAFTERS = [TechniqueSpec("plain"), TechniqueSpec("draft_model", {"layers": 2}), TechniqueSpec("token_recycling")]


@pytest.fixture(scope="module")
def model():
    return varied_model("llama")


def generate(model, cache, decode, n=10):
    spec = RunSpec(max_new_tokens=n, decode=decode, cache=cache)
    return [t for e in Engine(model, spec).run(PROMPT) for t in e.tokens]


@pytest.mark.parametrize("decode", DRAFTERS, ids=lambda t: t.name)
def test_a_window_longer_than_the_run_decodes_exactly_like_dense(model, decode):
    dense = generate(model, [], decode)
    assert generate(model, [TechniqueSpec("kivi", {"bits": 2, "residual": 1000})], decode) == dense
    assert generate(model, [TechniqueSpec("mustafar", {"sparsity": 0.0, "residual": 0})], decode) == dense


COMPRESSING = [TechniqueSpec("kivi", {"bits": 4, "group": 4, "residual": 4}),
               TechniqueSpec("gear", {"bits": 4, "group": 4, "residual": 4, "rank": 2}),
               TechniqueSpec("mustafar", {"sparsity": 0.5, "residual": 4}),
               TechniqueSpec("block_fp", {"bits": 8, "residual": 0})]


@pytest.mark.parametrize("form", COMPRESSING, ids=lambda t: t.name)
@pytest.mark.parametrize("decode", DRAFTERS[1:], ids=lambda t: t.name)
def test_compressed_forms_decode_with_drafters_and_under_eviction(model, form, decode):
    spec = RunSpec(max_new_tokens=8, decode=decode, cache=[form])
    events = list(Engine(model, spec).run(PROMPT))
    assert sum(len(e.tokens) for e in events) == 8
    stats = events[-1].cache_stats
    assert stats.tokens[0] == [len(PROMPT) + 7] * 2 and max(stats.bits[0]) < 32  # all held, compressed
    for evict in (TechniqueSpec("streaming", {"fraction": 0.5, "sinks": 2}), TechniqueSpec("h2o", {"fraction": 0.5})):
        # eviction after compression: streaming keeps the same tokens in every head, h2o per head (an observer)
        spec = RunSpec(max_new_tokens=6, decode=decode, cache=[form, evict])
        events = list(Engine(model, spec).run(PROMPT))
        held = events[-1].cache_tokens[0]
        assert held <= (len(PROMPT) + 5) // 2 + 1 and events[-1].cache_stats.tokens[0] == [held] * 2
        kept = events[-1].cache_stats.kept[0]
        assert all(len(set(h)) == held and max(h) == len(PROMPT) + 4 for h in kept)  # newest token always held


def test_parameters_the_model_cannot_take_are_refused(model):
    with pytest.raises(SpecError, match="must divide the model's head_dim"):
        generate(model, [TechniqueSpec("kivi", {"channels": 3})], TechniqueSpec("plain"), n=1)
    with pytest.raises(SpecError, match="skip_layers"):
        TechniqueSpec("kivi", {"skip_layers": "a-b"}).validated("cache")


def test_skip_layers_keep_the_previous_form_so_layers_can_differ(model):
    spec = RunSpec.parse("max_new_tokens=2;cache=kivi:skip_layers=0/2-3,residual=0,group=4")
    bits = list(Engine(model, spec).run(PROMPT))[-1].cache_stats.bits
    assert bits[0] == bits[2] == bits[3] == [32.0, 32.0] and bits[1][0] < 16  # float32 dense, and kivi
    # per-layer forms by composition: 2-bit kivi everywhere but layer 0, which the 4-bit policy before keeps
    spec = RunSpec.parse("max_new_tokens=2;cache=kivi:bits=4,residual=0,group=4+"
                               "kivi:bits=2,residual=0,group=4,skip_layers=0")
    bits = list(Engine(model, spec).run(PROMPT))[-1].cache_stats.bits
    assert bits[1] == bits[2] == bits[3] and bits[0][0] > bits[1][0] + 1  # 4 vs 2 bits, same scales
