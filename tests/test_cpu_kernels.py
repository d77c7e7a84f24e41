"""The workbench's CPU kernels (kernels/cpu_gemm.c): products, attention, norms, SwiGLU, RoPE; exact layouts, the
accuracy of one bf16 rounding, the same result for a row whatever the row count, the layers, the fallbacks."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench.compression.int4 import Int4Linear, quantize_rtn_int4
from workbench.compression.int8 import Int8Linear, quantize_int8
from workbench.kernels import cpu, dispatch
from workbench.models.packed_linear import PackedLinear

# This project's machines have AVX512-BF16 and a C compiler; elsewhere the layers keep torch's paths and the
# fallback test below covers them.
needs_kernels = pytest.mark.skipif(not cpu.available(), reason="no C compiler or no AVX512-BF16 on this CPU")

SHAPES = [(960, 576), (576, 1536), (48, 34)]  # SmolLM2's qkv and down projections, and an odd small shape


def reference(x, w, bias=None):
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


@pytest.fixture(params=["amx", "avx512-bf16"])
def product_unit(request):
    """Runs a test under each unit of the bf16 products (the tile unit where the CPU has AMX), then restores the
    process's own choice."""
    if not cpu.available():
        pytest.skip("no C compiler or no AVX512-BF16 on this CPU")
    was = cpu.product_unit() == "amx"
    if cpu.use_amx(request.param == "amx") != (request.param == "amx"):
        cpu.use_amx(was)
        pytest.skip("this CPU has no AMX-BF16 tiles, or Linux does not grant them")
    yield request.param
    cpu.use_amx(was)


@pytest.mark.parametrize("n,k", SHAPES)
def test_bf16_product_is_as_accurate_as_torch(n, k, product_unit):
    torch.manual_seed(0)
    w = torch.randn(n, k, dtype=torch.bfloat16) * 0.05
    bias = torch.randn(n, dtype=torch.bfloat16)
    for m in (1, 5, 13):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        y = cpu.gemm_bf16(x, cpu.pack_bf16(w), bias)
        ours = (y.double() - reference(x, w, bias)).abs().max()
        torch_err = (F.linear(x, w, bias).double() - reference(x, w, bias)).abs().max()
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        assert ours <= 1.5 * torch_err + 1e-6  # both are float32 sums rounded once to bf16


def test_a_row_gets_the_same_bits_whatever_the_row_count(product_unit):
    # what makes verifying a draft compute exactly the products a one-token step computes
    torch.manual_seed(1)
    w, bias = torch.randn(576, 1536, dtype=torch.bfloat16), torch.randn(576, dtype=torch.bfloat16)
    packed = cpu.pack_bf16(w)
    codes, scales = quantize_int8(w.float(), torch.bfloat16)
    packed_codes = cpu.pack_int8(codes)
    x = torch.randn(20, 1536, dtype=torch.bfloat16)
    singles = torch.cat([cpu.gemm_bf16(x[i:i + 1], packed, bias) for i in range(20)])
    singles8 = torch.cat([cpu.gemm_int8(x[i:i + 1], packed_codes, scales.float(), bias) for i in range(20)])
    codes4, params = cpu.pack_int4(*quantize_rtn_int4(w.float(), 32, torch.bfloat16))
    singles4 = torch.cat([cpu.gemm_int4(x[i:i + 1], codes4, params, 32, bias) for i in range(20)])
    for m in range(2, 21):  # AVX-512: 1..12 rows in one pass, 13..20 in balanced passes; AMX: passes of 16
        assert torch.equal(cpu.gemm_bf16(x[:m], packed, bias), singles[:m]), m
        assert torch.equal(cpu.gemm_int8(x[:m], packed_codes, scales.float(), bias), singles8[:m]), m
        assert torch.equal(cpu.gemm_int4(x[:m], codes4, params, 32, bias), singles4[:m]), m
    many = torch.randn(40, 1536, dtype=torch.bfloat16)  # several passes, the last one short
    assert torch.equal(cpu.gemm_bf16(many, packed, bias)[[0, 17, 39]],
                       torch.cat([cpu.gemm_bf16(many[i:i + 1], packed, bias) for i in (0, 17, 39)]))


def test_one_unit_serves_every_bf16_product():
    """The tile unit rounds a few outputs differently from AVX512-BF16, so it is chosen once per process
    (`WORKBENCH_CPU_AMX`) and reported; a product whose inputs are not a multiple of 32 stays on AVX-512."""
    if not cpu.available() or not cpu.use_amx(True):
        pytest.skip("this CPU has no AMX-BF16 tiles, or Linux does not grant them")
    assert cpu.product_unit() == "amx"
    torch.manual_seed(5)
    w, x = cpu.pack_bf16(torch.randn(4096, 1536, dtype=torch.bfloat16)), torch.randn(16, 1536, dtype=torch.bfloat16)
    odd_w, odd_x = cpu.pack_bf16(torch.randn(48, 34, dtype=torch.bfloat16)), torch.randn(3, 34, dtype=torch.bfloat16)
    tiles, odd_tiles = cpu.gemm_bf16(x, w, None), cpu.gemm_bf16(odd_x, odd_w, None)
    try:
        assert not cpu.use_amx(False) and cpu.product_unit() == "avx512-bf16"
        vectors, odd_vectors = cpu.gemm_bf16(x, w, None), cpu.gemm_bf16(odd_x, odd_w, None)
    finally:
        cpu.use_amx(True)
    assert torch.equal(odd_tiles, odd_vectors)  # 34 inputs: the AVX-512 product under both settings
    differing = (tiles != vectors).float().mean().item()
    assert 0 < differing < 1e-2  # the same sums but for a few roundings: why the units are never mixed
    assert (tiles.float() - vectors.float()).abs().max() <= tiles.float().abs().max() * 2**-7


@needs_kernels
@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_product_matches_the_dequantized_weight(n, k):
    torch.manual_seed(2)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n) * 0.01
    x = torch.randn(3, 2, k, dtype=torch.bfloat16)  # leading dims are kept
    y = cpu.gemm_int8(x, cpu.pack_int8(codes), scales, None)
    ref = reference(x.reshape(6, k), codes.double() * scales.double()[:, None])
    assert y.shape == (3, 2, n)
    # float32 sums, one bf16 rounding: within a bf16 ulp of the largest output
    assert (y.reshape(6, n).double() - ref).abs().max() <= ref.abs().max() * 2**-8


@needs_kernels
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("n,k", SHAPES[:2])
def test_int4_product_matches_the_dequantized_weight(n, k, group):
    torch.manual_seed(2)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // group) * 0.01).bfloat16()
    offsets = (-8 * scales.float() + torch.randn(n, k // group) * 1e-3).bfloat16()
    x = torch.randn(3, 2, k, dtype=torch.bfloat16)
    y = cpu.gemm_int4(x, *cpu.pack_int4(codes, scales, offsets), group, None)
    w = codes.double() * scales.double().repeat_interleave(group, 1) + offsets.double().repeat_interleave(group, 1)
    ref = reference(x.reshape(6, k), w)
    assert y.shape == (3, 2, n)
    # float32 sums of x * (128 + code), less 128 * sum(x) per group: still within a bf16 ulp of the largest output
    assert (y.reshape(6, n).double() - ref).abs().max() <= ref.abs().max() * 2**-8


def test_layouts_round_trip():
    w = torch.randn(64, 10, dtype=torch.bfloat16)
    codes = torch.randint(-127, 128, (64, 10), dtype=torch.int8)
    assert torch.equal(cpu.unpack_bf16(cpu.pack_bf16(w)), w)
    assert torch.equal(cpu.unpack_int8(cpu.pack_int8(codes)), codes)
    ids = torch.tensor([0, 17, 63, 17])
    assert torch.equal(cpu.int8_rows(cpu.pack_int8(codes), ids), codes[ids])
    codes4 = torch.randint(0, 16, (64, 96), dtype=torch.uint8)
    scales, offsets = torch.randn(2, 64, 3, dtype=torch.bfloat16)
    packed, params = cpu.pack_int4(codes4, scales, offsets)
    assert packed.shape == (4, 12, 64) and params.shape == (4, 3, 2, 16)
    assert torch.equal(cpu.unpack_int4(packed), codes4) and torch.equal(cpu.int4_rows(packed, ids), codes4[ids])
    assert all(torch.equal(a, b) for a, b in zip(cpu.int4_params(params), (scales, offsets)))
    assert all(torch.equal(a, b[ids]) for a, b in zip(cpu.int4_params(params, ids), (scales, offsets)))


@needs_kernels
def test_layers_use_the_kernels_and_keep_their_interface():
    torch.manual_seed(3)
    assert cpu.fits(64, 10) and not cpu.fits(60, 10) and not cpu.fits(64, 9)
    lin = nn.Linear(576, 960, bias=True).to(torch.bfloat16)
    packed = PackedLinear(lin)
    assert packed.own_kernel and torch.equal(packed.weight, lin.weight)
    x = torch.randn(4, 576, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert (packed(x).double() - reference(x, lin.weight, lin.bias)).abs().max() < 0.1
        assert packed(x.float()).dtype == torch.float32  # another dtype takes a plain product

    codes, scales = quantize_int8(lin.weight.detach(), torch.bfloat16)
    layer = Int8Linear(codes, scales, None)
    assert layer.own_kernel and torch.equal(layer.dense_codes(), codes)
    assert layer.weight_nbytes() == 960 * 576 + 960 * (2 + 4)  # codes, bf16 scales, the kernel's float32 scales
    ids = torch.tensor([5, 900])
    assert torch.equal(layer.rows(ids), layer.dequantized_weight()[ids])
    with torch.inference_mode():
        torch_path = torch.ops.aten._weight_int8pack_mm(x, codes, scales)
        assert (layer(x).float() - torch_path.float()).abs().max() <= torch_path.abs().max() * 2**-7


def test_without_the_kernels_the_layers_keep_torchs_paths(monkeypatch):
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_tried", True)
    assert not cpu.available() and not cpu.fits(64, 32)
    lin = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    codes, scales = quantize_int8(lin.weight.detach(), torch.bfloat16)
    layer = Int8Linear(codes, scales, None)
    assert not layer.own_kernel and torch.equal(layer.codes, codes)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), torch.ops.aten._weight_int8pack_mm(x, codes, scales))
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            packed = PackedLinear(lin)
            assert not packed.own_kernel and torch.equal(packed(x), F.linear(x, lin.weight))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_tried", False)
    monkeypatch.setenv("WORKBENCH_CPU_KERNELS", "0")
    assert not cpu.available()


@pytest.mark.parametrize("length,rows", [(1, 1), (7, 3), (100, 1), (333, 11), (64, 64), (1500, 9)])
def test_attention_matches_float64_over_a_strided_cache_view(length, rows, product_unit):
    from workbench.models.attention import _grouped_attention

    torch.manual_seed(4)
    buffer_k, buffer_v = (torch.randn(3, 2048, 64, dtype=torch.bfloat16) for _ in range(2))
    k, v = buffer_k[:, :length], buffer_v[:, :length]  # as a cache's view of its preallocated buffer
    q = torch.randn(rows, 15, 64, dtype=torch.bfloat16)[:, :9]  # q heads sliced out of a fused q|k|v output
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[:, length - rows:] = torch.rand(rows, rows) > 0.5  # a draft tree among the new rows
    mask[torch.arange(rows), length - rows + torch.arange(rows)] = True
    exact = _grouped_attention(q.transpose(0, 1).double(), k.double(), v.double(), mask).transpose(0, 1)
    ours = cpu.attention(q, k, v, mask)
    torch_sdpa = _grouped_attention(q.transpose(0, 1), k, v, mask).transpose(0, 1)
    assert ours.shape == (rows, 9 * 64)
    ours_err = (ours.double() - exact.reshape(rows, -1)).abs().max()
    assert ours_err <= 1.5 * (torch_sdpa.double() - exact).abs().max() + 1e-3
    if rows == 1:  # no mask: every key visible
        unmasked = _grouped_attention(q.transpose(0, 1).double(), k.double(), v.double(), None).transpose(0, 1)
        assert (cpu.attention(q, k, v, None).double() - unmasked.reshape(1, -1)).abs().max() < 2e-2


@pytest.mark.parametrize("past", [5, 250, 255, 509, 1030])
def test_a_draft_row_gets_the_bits_of_its_one_token_step(past, product_unit):
    """A draft tree's row attends to the cache and its ancestors among the new rows; once accepted, those sit
    side by side in the cache and the token's next step sees them there. Both must give the same bits, across
    the AMX kernel's chunk boundaries (every 256 keys) and blocks (32)."""
    torch.manual_seed(past)
    rows = 12
    parents = [-1] + [int(torch.randint(0, i, ())) for i in range(1, rows)]
    k, v = (torch.randn(3, past + rows, 64, dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(rows, 9, 64, dtype=torch.bfloat16)
    mask = torch.zeros(rows, past + rows, dtype=torch.bool)
    mask[:, :past] = True
    for t in range(rows):
        node = t
        while node >= 0:
            mask[t, past + node] = True
            node = parents[node]
    tree = cpu.attention(q, k, v, mask)
    for t in range(rows):
        seen = mask[t].nonzero().squeeze(1)  # the cache, then the ancestors and the row itself, in slot order
        alone = cpu.attention(q[t:t + 1], k[:, seen].contiguous(), v[:, seen].contiguous(), None)
        assert torch.equal(tree[t:t + 1], alone), (past, t)


@needs_kernels
def test_attention_sees_only_what_the_mask_allows():
    # a wrong mask handling would mix in the hidden keys, whose values are huge here
    k = torch.randn(1, 4, 16, dtype=torch.bfloat16)
    v = torch.zeros(1, 4, 16, dtype=torch.bfloat16)
    v[0, 1:] = 1000.0
    q = torch.randn(1, 2, 16, dtype=torch.bfloat16)
    mask = torch.tensor([[True, False, False, False]])
    assert torch.equal(cpu.attention(q, k, v, mask), torch.zeros(1, 32, dtype=torch.bfloat16))


@needs_kernels
def test_rms_norm_and_residual_add_match_float64():
    torch.manual_seed(6)
    x, delta = torch.randn(5, 576, dtype=torch.bfloat16), torch.randn(5, 576, dtype=torch.bfloat16)
    weight = torch.rand(576, dtype=torch.bfloat16) + 0.5
    total, y = cpu.rms_norm(x, weight, 1e-5, delta)
    assert torch.equal(total, x + delta)  # the residual stream rounds as torch's add does
    t = total.double()
    exact = t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    assert (y.double() - exact).abs().max() <= exact.abs().max() * 2**-8  # one bf16 rounding
    same, alone = cpu.rms_norm(x, weight, 1e-5)
    assert same is x and torch.equal(alone[2:3], cpu.rms_norm(x[2:3], weight, 1e-5)[1])  # rows independent


@needs_kernels
def test_swiglu_matches_float64():
    torch.manual_seed(7)
    gate_up = torch.randn(3, 2 * 1536, dtype=torch.bfloat16) * 4  # silu's tails included
    gate, up = gate_up.double().chunk(2, dim=-1)
    exact = gate * torch.sigmoid(gate) * up
    out = cpu.swiglu(gate_up)
    assert out.shape == (3, 1536)
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-6).all()


@needs_kernels
def test_rope_matches_the_half_layout_rotation():
    torch.manual_seed(8)
    dim, half = 64, 32
    positions = torch.tensor([0, 5, 300])
    freqs = positions.double()[:, None, None] / 10000 ** (torch.arange(0, dim, 2).double() / dim)
    cos, sin = freqs.cos().repeat(1, 1, 2), freqs.sin()
    signed_sin = torch.cat((-sin, sin), dim=-1)
    fused = torch.randn(3, 8, dim, dtype=torch.bfloat16)  # q|k|v heads of a fused product
    x = fused[:, :6]  # q and k: rows 8 heads apart
    assert cpu.rope_fits(x, cos.to(torch.bfloat16), signed_sin.to(torch.bfloat16))
    assert not cpu.rope_fits(fused[..., :16], cos[..., :16].to(torch.bfloat16), signed_sin[..., :16].to(torch.bfloat16))
    ours = cpu.rope(x, cos.to(torch.bfloat16), signed_sin.to(torch.bfloat16))
    x1, x2 = x.double()[..., :half], x.double()[..., half:]
    exact = torch.cat((x1 * cos[..., :half] - x2 * sin, x2 * cos[..., half:] + x1 * sin), dim=-1)
    assert ours.shape == x.shape and ours.is_contiguous()
    assert (ours.double() - exact).abs().max() <= exact.abs().max() * 2**-7  # bf16 tables and one rounding


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_a_cache_folder_that_cannot_be_written_falls_back_with_a_warning(monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("WORKBENCH_KERNEL_CACHE", str(blocked / "kernels"))
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_tried", False)
    monkeypatch.setattr(cpu, "_reason", "")  # restored after the test, so later tests see the real state
    with pytest.warns(UserWarning, match="could not be built"):
        assert not cpu.available()


@needs_kernels
@pytest.mark.parametrize("weights", ["bf16", "int8", "int4", "int8_a8", "int4_a8", "mixed"])
def test_the_one_call_decoder_layer_gives_the_bits_of_the_separate_calls(monkeypatch, weights):
    """A prompt, a decode step, a draft tree with a rejected branch, then steps that grow the cache: the
    logits and the cache of the one-call layers equal those of the layers' separate kernel calls. "_a8": over int8
    activations (act=int8). "mixed": the middle layer's q|k|v has a bias, which the one-call layer does not take,
    so the others run one call each."""
    from workbench.decoding.base import DraftTree
    from workbench.engine import build_cache
    from workbench.models.packed_linear import pack_linears
    from workbench.models.random import random_model

    model = random_model("smollm", dtype=torch.bfloat16, vocab_size=512, hidden_size=192, intermediate_size=256,
                         num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2)
    if weights == "mixed":
        model.layers[1].qkv.bias = nn.Parameter(torch.randn(model.layers[1].qkv.out_features, dtype=torch.bfloat16))
    kind, a8 = weights.removesuffix("_a8"), weights.endswith("_a8")
    for layer in model.layers if kind in ("int8", "int4") else []:  # the layers' products; the head stays bf16
        for name in ("qkv", "o", "gate_up", "down"):
            w = getattr(layer, name).weight
            setattr(layer, name, Int8Linear(*quantize_int8(w, torch.bfloat16), None, a8) if kind == "int8" else
                    Int4Linear.from_affine(*quantize_rtn_int4(w, 32, torch.bfloat16), 32, None, torch.bfloat16, a8))
            assert getattr(layer, name).kernel_weights() is not None
    pack_linears(model)
    calls = []  # layers per call
    one_call = cpu.decoder_layers
    monkeypatch.setattr(cpu, "decoder_layers", lambda x, rows, *a: calls.append(len(rows)) or one_call(x, rows, *a))
    ops = dispatch.kernels(torch.device("cpu"), torch.bfloat16)

    def run(fused: bool):
        if not fused:  # every layer on its own: its separate kernel calls
            monkeypatch.setattr(ops, "fuses", lambda *args: False)
        cache, logits = build_cache(model, [], 24), []
        with torch.inference_mode():
            logits.append(model(torch.arange(20), torch.arange(20), cache).logits)
            cache.commit()
            tree = DraftTree([3, 4, 5, 6], [-1, 0, 0, 2])
            logits.append(model(torch.tensor([9, *tree.tokens]), tree.positions(20), cache,
                                mask=tree.attention_mask()).logits)
            cache.commit([0, 2])  # the root and one branch: the other's slots are dropped
            for i in range(8):
                logits.append(model(torch.tensor([11 + i]), torch.tensor([22 + i]), cache).logits)
                cache.commit()
        return logits, cache

    fused_logits, fused_cache = run(True)
    assert calls == ([1, 1] if weights == "mixed" else [3]) * 10  # every forward's kernel layers in one call
    plain_logits, plain_cache = run(False)
    assert all(torch.equal(a, b) for a, b in zip(fused_logits, plain_logits))
    for a, b in zip(fused_cache.layers, plain_cache.layers):
        assert torch.equal(a.view()[0], b.view()[0]) and torch.equal(a.view()[1], b.view()[1])
        assert torch.equal(a.positions, b.positions)


@needs_kernels
def test_the_one_call_layers_see_a_replaced_product_and_moved_weights(monkeypatch):
    """The layers keep each layer's weight pointers between steps (backend_c._weight_args): a product replaced
    after a forward, and weights moved to new memory, must be what the next forward reads."""
    from workbench.engine import build_cache
    from workbench.models.packed_linear import pack_linears
    from workbench.models.random import random_model

    model = random_model("smollm", dtype=torch.bfloat16, vocab_size=512, hidden_size=192, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2)
    pack_linears(model)
    ops = dispatch.kernels(torch.device("cpu"), torch.bfloat16)

    def logits(fused: bool):
        with monkeypatch.context() as patch:
            if not fused:
                patch.setattr(ops, "fuses", lambda *args: False)
            cache = build_cache(model, [], 16)
            with torch.inference_mode():
                return model(torch.arange(6), torch.arange(6), cache).logits

    assert torch.equal(logits(True), logits(False))
    w = model.layers[1].down.weight
    model.layers[1].down = Int8Linear(*quantize_int8(w * 3, torch.bfloat16), None)  # a transform's replacement
    assert torch.equal(logits(True), logits(False))
    with torch.no_grad():  # the norms' data moved to new memory, as module.to() moves parameters
        model.layers[0].attn_norm.data = model.layers[0].attn_norm.data * 2
    assert torch.equal(logits(True), logits(False))


@needs_kernels
@pytest.mark.parametrize("n", [49152, 1000, 7])  # a vocabulary, a width not a multiple of 16, a short row
def test_topk_matches_torch_and_argmax(n):
    torch.manual_seed(0)
    x = torch.randn(9, n)
    x[3] = torch.arange(n, dtype=torch.float32)  # ascending: every value displaces one kept before
    x[4, -1] = float("-inf")
    for k in sorted({k for k in (1, 5, 8, n) if k <= n}):
        values, indices = cpu.topk(x, k)
        expected = torch.topk(x, k, dim=-1)
        assert torch.equal(values, expected.values) and torch.equal(x.gather(1, indices), values)
        if k <= 8:  # random values tie only deep in a sorted row, where torch's order among ties is its own
            assert torch.equal(indices, expected.indices)
    assert torch.equal(cpu.topk(x, 1)[1][:, 0], x.argmax(-1))


@needs_kernels
def test_topk_keeps_equal_values_in_index_order():
    x = torch.tensor([[0.0, 3.0, 1.0, 3.0, float("-inf"), 3.0, 2.0],
                      [float("-inf")] * 5 + [1.0, float("-inf")]])
    values, indices = cpu.topk(x, 5)
    assert indices[0].tolist() == [1, 3, 5, 6, 2] and values[0].tolist() == [3.0, 3.0, 3.0, 2.0, 1.0]
    assert indices[1].tolist() == [5, 0, 1, 2, 3]  # -inf rows still fill k, first indices first
    assert cpu.topk(x, 1)[1][:, 0].tolist() == x.argmax(-1).tolist()


def test_top_k_falls_back_to_torch_where_the_kernel_does_not_take_the_tensor():
    from workbench.sampling import argmax_rows, top_k
    x = torch.randn(4, 300, dtype=torch.float64)  # not float32
    values, indices = top_k(x, 3)
    assert torch.equal(indices, torch.topk(x, 3).indices) and torch.equal(values, torch.topk(x, 3).values)
    y = torch.randn(300, 4).T  # not contiguous
    assert not cpu.topk_fits(y, 3)
    assert argmax_rows(y) == y.argmax(-1).tolist()
