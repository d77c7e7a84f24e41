"""A storage form per kv head: `raw_heads` keeps chosen heads of a compressed layer in the model's dtype while
the others use the codec. Raw heads are exact and cost dense bytes, coded heads are unchanged by the choice,
and the cache contract (commit, rollback, tree offsets, keep) and decoding with eviction and drafters hold."""

import pytest
import torch

from workbench.cache.block_fp import BlockFPCodec
from workbench.cache.gear import GearCodec
from workbench.cache.kivi import KiviCodec
from workbench.cache.mustafar import MustafarCodec, MustafarLayerCache
from workbench.cache.quantized import CompressedLayerCache, parse_heads
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.models.attention import _grouped_attention
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import varied_model
from .test_cache_quant import append_a_draft_tree

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
H, D = 3, 64


def codecs():
    return {"kivi": KiviCodec(2, 16, 32), "gear": GearCodec(2, 16, 4, 0.02, D),
            "block_fp": BlockFPCodec(4, 32, True), "mustafar": MustafarCodec(D, 0.5, torch.float32)}


def filled(name, raw_heads=(), n=70, residual=0, dtype=torch.float32):
    cls = MustafarLayerCache if name == "mustafar" else CompressedLayerCache
    cache = cls(codecs()[name], H, D, dtype, CPU, 16, residual, raw_heads)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(H, n, D, generator=g).to(dtype), torch.randn(H, n, D, generator=g).to(dtype)
    cache.append(k, v, torch.arange(n).expand(H, -1))
    cache.commit()
    return cache, k, v


@pytest.mark.parametrize("name", list(codecs()))
def test_a_raw_head_is_exact_and_the_other_heads_are_coded_as_without_it(name):
    plain, k, v = filled(name)
    mixed, _, _ = filled(name, raw_heads=[1])
    n = 70 if plain.codec.group == 1 else 64  # kivi and gear encode whole groups of 16
    assert mixed.n_compressed == plain.n_compressed == n  # the same slots compressed: only the form differs
    (pk, pv), (mk, mv) = plain.view(), mixed.view()
    assert torch.equal(mk[1], k[1]) and torch.equal(mv[1], v[1])
    assert not torch.equal(pk[1], k[1])  # without raw_heads, head 1 is coded (lossy)
    for head in (0, 2):  # coded heads: exactly what the codec gives them without the raw head
        assert torch.equal(mk[head], pk[head]) and torch.equal(mv[head], pv[head])
        assert not torch.equal(mk[head], k[head])
    assert mixed.tok[next(iter(mixed.tok))].shape[0] == 2  # really stored: the codec holds 2 heads' fields
    assert mixed.full["k"].shape == (1, n, D) and mixed.full["k"].dtype == torch.float32


def test_raw_heads_keep_the_models_dtype_bit_for_bit():
    cache, k, v = filled("kivi", raw_heads=[0, 2], dtype=torch.bfloat16)
    ck, cv = cache.view()
    assert ck.dtype == torch.bfloat16 and cache.full["v"].dtype == torch.bfloat16
    assert torch.equal(ck[[0, 2]], k[[0, 2]]) and torch.equal(cv[[0, 2]], v[[0, 2]])


@pytest.mark.parametrize("name", list(codecs()))
def test_bytes_per_head_are_real_and_add_up(name):
    plain, _, _ = filled(name, residual=8)
    mixed, k, v = filled(name, raw_heads=[2], residual=8)
    for cache in (plain, mixed):  # 5 more tokens, committed: they stay in the residual window
        cache.append(k[:, :5], v[:, :5], torch.arange(70, 75).expand(H, -1))
        cache.commit()
    n, tail = mixed.n_compressed, mixed.raw.length
    assert tail > 0  # the residual window costs the same in every head
    per_head = mixed.nbytes_per_head()
    assert per_head[2] == 2 * n * D * 4 + tail * (2 * D * 4 + 8)  # dense: K and V in float32, positions implicit
    assert per_head[:2].tolist() == plain.nbytes_per_head()[:2].tolist()
    assert per_head[2] > per_head[0] and mixed.nbytes() == int(per_head.sum()) > plain.nbytes()
    tokens, total, kv, held = mixed.head_stats()
    assert torch.equal(torch.as_tensor(total), per_head) and torch.as_tensor(tokens).tolist() == [n + tail] * H
    assert kv[2] == 2 * (n + tail) * D * 4  # 32 bits per element: dense
    assert kv[0] < kv[2] and float(held[2]) == 1.0
    if name == "mustafar":
        assert float(held[0]) == pytest.approx((n * 0.5 + tail) / (n + tail))
    all_raw, _, _ = filled(name, raw_heads=[0, 1, 2], residual=8)
    n, tail = all_raw.n_compressed, all_raw.raw.length
    assert all_raw.nbytes_per_head().tolist() == [2 * (n + tail) * D * 4 + tail * 8] * H
    assert not all_raw.tok and not all_raw.grp  # nothing coded at all


@pytest.mark.parametrize("name", list(codecs()))
def test_commit_rollback_tree_offsets_and_keep_with_mixed_heads(name):
    cache, k, v = filled(name, raw_heads=[0, 2], n=40, residual=10 if name in ("mustafar", "block_fp") else 0)
    assert cache.n_compressed >= 30  # kivi and gear: 2 groups of 16; mustafar: all but its sliding window of 10
    before = cache.view()
    new = torch.arange(4 * H * D, dtype=torch.float32).view(H, 4, D)
    cache.append(new, -new, torch.tensor([40, 41, 41, 42]).expand(H, -1))
    cache.rollback()
    assert cache.length == 40 and torch.equal(cache.view()[0], before[0])
    cache.append(new, -new, torch.tensor([40, 41, 41, 42]).expand(H, -1))
    cache.commit([0, 2])  # a tree: the root and the second branch
    assert cache.length == cache.n_committed == 42 and torch.equal(cache.view()[1][:, 41], -new[:, 2])
    k_all, v_all = cache.view()
    assert torch.equal(k_all[[0, 2], :40], k[[0, 2]])  # raw heads: exact in the compressed slots too
    slots = torch.tensor([0, 3, 17, 20, 33, 40, 41])
    cache.keep(slots)  # the same tokens in every head: gathered, never re-encoded
    assert torch.equal(cache.view()[0], k_all[:, slots]) and torch.equal(cache.view()[1], v_all[:, slots])
    k_all, v_all, pos = *cache.view(), cache.positions
    per_head = torch.tensor([[0, 1, 2, 5], [1, 3, 4, 6], [0, 2, 3, 4]])
    cache.keep(per_head)  # per head, a different number of them compressed: extras decoded into the raw tail
    index = per_head[:, :, None].expand(-1, -1, D)
    assert torch.equal(cache.view()[0], k_all.gather(1, index)) and torch.equal(cache.view()[1], v_all.gather(1, index))
    assert torch.equal(cache.positions, pos.gather(1, per_head)) and cache.n_committed == cache.length == 4
    assert int(cache.nbytes_per_head().sum()) == cache.nbytes() > 0
    cache.truncate(2)
    assert torch.equal(cache.view()[0], k_all.gather(1, index)[:, :2])


def test_mustafar_attends_raw_heads_densely_and_the_others_sparsely():
    cache, k, v = filled("mustafar", raw_heads=[1], n=50, residual=8)
    q, mask = append_a_draft_tree(cache, k, v)
    pk, pv = cache.view()
    assert torch.equal(pk[1], torch.cat([k[1], k[1, :3]]))
    assert torch.allclose(cache.attend(q, mask), _grouped_attention(q, pk, pv, mask), atol=1e-5)
    everything_raw, _, _ = filled("mustafar", raw_heads=[0, 1, 2], n=50, residual=8)
    full = torch.ones(3, 50, dtype=torch.bool)
    assert torch.allclose(everything_raw.attend(q, full), _grouped_attention(q, k, v, full), atol=1e-5)


# --- decoding ---------------------------------------------------------------------------------------------
PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6] + list(range(40, 60))  # 34 tokens
PLAIN = TechniqueSpec("plain")
DRAFTERS = [TechniqueSpec("token_recycling"), TechniqueSpec("prompt_lookup")]


@pytest.fixture(scope="module")
def model():
    return varied_model("llama")  # float32, 2 kv heads of 16 channels, 4 layers


def run(model, cache, decode=PLAIN, n=8):
    events = list(Engine(model, RunSpec(max_new_tokens=n, decode=decode, cache=cache)).run(PROMPT))
    return [t for e in events for t in e.tokens], events[-1].cache_stats


def form(name, **params):
    small = {"kivi": {"bits": 2, "group": 4, "residual": 4}, "gear": {"bits": 2, "group": 4, "residual": 4},
             "mustafar": {"sparsity": 0.5, "residual": 4}, "block_fp": {"bits": 4, "residual": 0}}
    return TechniqueSpec(name, {**small[name], **params})


@pytest.mark.parametrize("name", ["kivi", "gear", "mustafar", "block_fp"])
def test_every_head_raw_decodes_exactly_like_the_dense_cache(model, name):
    dense, _ = run(model, [])
    tokens, stats = run(model, [form(name, raw_heads="0-1")])
    assert tokens == dense and stats.bits == [[32.0, 32.0]] * 4  # compressed slots, all in float32
    for decode in DRAFTERS:  # lossless whatever the flush timing, so drafters match too
        assert run(model, [form(name, raw_heads="0-1")], decode)[0] == dense
    _, stats = run(model, [form(name)])
    assert max(stats.bits[0]) < 32  # the same form without raw heads really compresses


def test_raw_heads_per_layer_and_head_show_in_the_stats(model):
    _, stats = run(model, [form("kivi", raw_heads="1@0/0@2-3")])
    bits = stats.bits
    assert bits[0][1] == bits[2][0] == bits[3][0] == 32.0
    assert max(bits[0][0], *bits[1], bits[2][1], bits[3][1]) < 8
    assert stats.bytes[0][1] > 3 * stats.bytes[0][0]  # the raw head costs dense bytes, the heatmap shows it


@pytest.mark.parametrize("evict", [TechniqueSpec("streaming", {"fraction": 0.5, "sinks": 2}),
                                   TechniqueSpec("h2o", {"fraction": 0.5})], ids=lambda t: t.name)
@pytest.mark.parametrize("decode", [PLAIN, *DRAFTERS], ids=lambda t: t.name)
def test_eviction_over_all_raw_heads_decodes_like_eviction_over_dense(model, evict, decode):
    # streaming keeps the same tokens in every head (1-D keep), h2o its own per head (per-head keep) every step
    reference, _ = run(model, [evict], decode)
    assert run(model, [evict, form("kivi", raw_heads="0/1")], decode)[0] == reference
    assert run(model, [form("kivi", raw_heads="0/1"), evict], decode)[0] == reference


@pytest.mark.parametrize("evict", [TechniqueSpec("streaming", {"fraction": 0.75, "sinks": 2, "continuous": False}),
                                   TechniqueSpec("h2o", {"fraction": 0.75, "continuous": False})],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("decode", DRAFTERS, ids=lambda t: t.name)
def test_drafters_decode_like_plain_over_mixed_heads(model, evict, decode):
    # kivi in groups of 32: the prompt is compressed at prefill and evicted from (per head for h2o), then nothing
    # is flushed while decoding (drafts and accepted tokens stay in the raw tail), so the drafter's verification
    # must reproduce plain decoding exactly. (A flush inside an accepted run would legitimately differ: plain
    # decoding sees the earlier tokens of the run quantized, a verified draft sees them raw.)
    chain = [evict, form("kivi", raw_heads="1", group=32, residual=0)]
    plain, stats = run(model, chain, PLAIN, n=6)
    assert max(stats.bits[0][0], stats.bits[3][0]) < 16 and stats.bits[0][1] == 32.0
    assert run(model, chain, decode, n=6)[0] == plain
    assert run(model, chain[::-1], decode, n=6)[0] == run(model, chain[::-1], PLAIN, n=6)[0]


def test_mixed_heads_decode_with_drafters_under_continuous_eviction(model):
    for decode in DRAFTERS:
        tokens, stats = run(model, [TechniqueSpec("streaming", {"fraction": 0.5}), form("mustafar", raw_heads="1")],
                            decode)
        assert len(tokens) == 8 and all(layer[1] == 32.0 > layer[0] for layer in stats.bits)
        # rank 0: at head_dim 16 and groups of 4, GEAR's low-rank factors would cost more than float32 itself
        chain = [TechniqueSpec("h2o", {"fraction": 0.5}), form("gear", raw_heads="0", rank=0)]
        tokens, stats = run(model, chain, decode)
        assert len(tokens) == 8 and all(layer[0] == 32.0 > 2 * layer[1] for layer in stats.bits)
        assert stats.tokens == [[21, 21]] * 4  # h2o's budget: half of the 42 tokens of context


def test_raw_heads_syntax_and_refusals(model):
    assert parse_heads("0") == {None: {0}}
    assert parse_heads("2/1@3/0-2@5-6") == {None: {2}, 3: {1}, 5: {0, 1, 2}, 6: {0, 1, 2}}
    assert parse_heads("") == {}
    for bad in ("x", "1@", "@2", "2-1", "-1", "1@2@3"):
        with pytest.raises(SpecError, match=r"raw_heads: .* is not a head or heads@layers; write heads or"):
            TechniqueSpec("kivi", {"raw_heads": bad}).validated("cache")
    with pytest.raises(SpecError, match="raw_heads names layer 2, which skip_layers leaves in the previous form"):
        TechniqueSpec("gear", {"raw_heads": "0@2", "skip_layers": "1-2"}).validated("cache")
    with pytest.raises(SpecError, match=r"kv head 2 does not exist; the model has 2 kv heads per layer \(0-1\)"):
        run(model, [form("mustafar", raw_heads="0-2")], n=1)
    with pytest.raises(SpecError, match=r"layer 4 does not exist; the model has 4 layers \(0-3\)"):
        run(model, [form("block_fp", raw_heads="0@4")], n=1)
    spec = RunSpec.parse("max_new_tokens=1;cache=kivi:bits=2,raw_heads=1@0/0@2-3")  # the spec string round-trips
    assert RunSpec.parse(spec.to_string()).cache[0].params["raw_heads"] == "1@0/0@2-3"
