"""The Triton kernels (kernels/triton_*.py) in Triton's interpreter on CPU tensors, beyond the dispatch test's
one case per operation: several key chunks merged, grouped and causal tree attention, shapes off the block
sizes, fallbacks, the compressed layers and a whole model through the seam.

Not collected on its own (its name): tests/test_triton_kernels.py runs it in a subprocess with
TRITON_INTERPRET=1, which Triton needs before it is first imported."""

import pytest
import torch

from tests.test_kernel_dispatch import close, exact_attention, tree_mask
from workbench.compression.int4 import Int4Linear, quantize_rtn_int4
from workbench.compression.int8 import Int8Linear, quantize_int8
from workbench.kernels import backend_triton, dispatch, triton_attention, triton_kivi

B16 = torch.bfloat16
CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not backend_triton.interpreting(), reason="needs TRITON_INTERPRET=1 from the start")


@pytest.fixture(autouse=True)
def triton_forced(monkeypatch):
    monkeypatch.setenv("WORKBENCH_KERNELS", "triton")
    dispatch.reset()
    yield
    dispatch.reset()


def test_the_interpreter_makes_the_backend_take_cpu_tensors():
    assert backend_triton.available() and backend_triton.supports("attention", CPU, B16)
    assert not backend_triton.supports("attention", torch.device("cuda"), B16)  # compiled kernels only on CUDA
    assert not backend_triton.supports("topk", CPU, torch.float32) and not backend_triton.supports("linear", CPU, B16)


@pytest.mark.parametrize("chunk", [32, 64, None])
def test_decode_attention_merges_key_chunks(chunk):
    torch.manual_seed(1)
    q = torch.randn(1, 8, 40, dtype=B16)  # 4 query heads per kv head; dim 40 pads to a block of 64
    k, v = torch.randn(2, 150, 40, dtype=B16), torch.randn(2, 150, 40, dtype=B16)
    out = triton_attention.attention(q, k, v, chunk)
    assert triton_attention.chunk_size(150, 2) % triton_attention.BLOCK_S == 0
    assert out.shape == (1, 320) and close(out, exact_attention(q, k, v, None), 2**-6)


@pytest.mark.parametrize("masked", [True, False])
def test_tree_attention_over_chunks_with_the_tree_mask_or_causal(masked):
    torch.manual_seed(2)
    n, past = 5, 70
    q = torch.randn(n, 4, 32, dtype=B16)
    k, v = torch.randn(1, past + n, 32, dtype=B16), torch.randn(1, past + n, 32, dtype=B16)
    mask = tree_mask(n) if masked else torch.ones(n, n, dtype=torch.bool).tril()
    visible = torch.cat([torch.ones(n, past, dtype=torch.bool), mask], dim=1)
    out = triton_attention.tree_attention(q, k, v, mask if masked else None, past, 32)  # three chunks
    assert close(out, exact_attention(q, k, v, visible), 2**-6)
    assert not close(out, exact_attention(q, k, v, None), 2**-6)  # the mask matters


def test_inputs_the_kernels_do_not_take_fall_back_to_the_reference():
    ops = dispatch.kernels(CPU, B16)
    q, k, v = torch.randn(70, 4, 32, dtype=B16), torch.randn(2, 80, 32, dtype=B16), torch.randn(2, 80, 32, dtype=B16)
    with dispatch.recording() as used:
        ops.tree_attention(q, k, v, None, 10)  # 2 x 70 query rows: more than one program holds
        ops.attention(q[:1], k, v)
    assert used == {("tree_attention", "torch"), ("attention", "triton")}
    with dispatch.recording() as used:
        ops.rms_norm(torch.randn(64, 3, dtype=B16).T, torch.ones(64, dtype=B16), 1e-5)  # rows not contiguous
    assert used == {("rms_norm", "torch")}


@pytest.mark.parametrize("splits", [1, 3])
def test_the_products_off_the_block_sizes(splits):
    """Partial blocks of rows and inputs, and the inputs cut into slices (split-K) with a bias added once."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 200, dtype=B16)  # 6 rows; K = 200 is not a multiple of the int8 kernel's 128
    w, bias = torch.randn(100, 200) * 0.1, torch.randn(100, dtype=B16)  # N = 100: a partial block of rows
    codes, scales = quantize_int8(w, B16)
    out = backend_triton.linear_int8(x, *backend_triton.pack_int8(codes, scales), bias, splits)
    exact = x.double() @ (codes.double() * scales.double()[:, None]).T + bias.double()
    assert out.shape == (2, 3, 100) and close(out, exact, 2**-6)
    w4 = torch.randn(128, 288) * 0.1  # groups of 96: a block of 128 inputs spans two groups
    codes4, s4, o4 = quantize_rtn_int4(w4, 96, B16)
    weight = codes4.double() * s4.double().repeat_interleave(96, 1) + o4.double().repeat_interleave(96, 1)
    x4 = torch.randn(2, 288, dtype=B16)
    out = backend_triton.linear_int4(x4, *backend_triton.pack_int4(codes4, s4, o4, B16), 96, bias[:0].new_ones(128),
                                     splits)
    assert close(out, x4.double() @ weight.T + 1, 2**-6)
    assert backend_triton.weight_fits("int4", 128, 256, 64) and not backend_triton.weight_fits("int4", 96, 256, 64)
    assert not backend_triton.weight_fits("int4", 128, 256, 48) and not backend_triton.weight_fits("bf16", 64, 64)


def test_compressed_layers_run_the_triton_products():
    torch.manual_seed(4)
    w, bias, x = torch.randn(128, 64) * 0.1, torch.randn(128, dtype=B16), torch.randn(3, 64, dtype=B16)
    int8 = Int8Linear(*quantize_int8(w, B16), bias)
    int4 = Int4Linear.from_affine(*quantize_rtn_int4(w, 32, B16), 32, bias)
    for layer in (int8, int4):
        with dispatch.recording() as used:
            y = layer(x)
        assert not layer.simulated and dispatch.backends_used(used) in ({"linear_int8": "triton"},
                                                                         {"linear_int4": "triton"})
        exact = x.double() @ layer.dequantized_weight().double().T + bias.double()
        assert close(y, exact, 2**-6)


def test_a_model_runs_through_the_triton_kernels(monkeypatch):
    from workbench.engine import build_cache
    from workbench.models.packed_linear import pack_linears
    from workbench.models.random import random_model

    def logits(force: str):
        monkeypatch.setenv("WORKBENCH_KERNELS", force)
        dispatch.reset()
        model = random_model("smollm", dtype=B16, vocab_size=128, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        pack_linears(model)
        cache = build_cache(model, [], 32)
        with dispatch.recording() as used, torch.inference_mode():
            model(torch.arange(8), torch.arange(8), cache)  # the prompt: prefill attention stays with torch
            cache.commit()
            tree = model(torch.tensor([3, 4, 5, 6]), torch.tensor([8, 9, 9, 10]), cache, tree_mask(4)).logits
        return tree, dispatch.backends_used(used)

    ours, used = logits("triton")
    reference, _ = logits("torch")
    assert {op for op, name in used.items() if name == "triton"} >= {"rms_norm", "add_rms_norm", "rope_append",
                                                                       "swiglu", "tree_attention"}
    assert close(ours, reference.double(), 2**-4)


@pytest.mark.parametrize("bits,evict", [(2, False), (4, False), (2, True)])
def test_kivi_attention_reads_the_codes_as_the_cache_holds_them(bits, evict):
    from workbench.cache.kivi import KiviCodec
    from workbench.cache.quantized import CompressedLayerCache

    torch.manual_seed(5)
    layer = CompressedLayerCache(KiviCodec(bits, 32, 16), 2, 32, B16, CPU, 256, residual=32)
    layer.append(*torch.randn(2, 2, 100, 32, dtype=B16), torch.arange(100))
    layer.commit()  # 96 tokens coded in 3 groups, 4 raw
    if evict:  # an eviction moves tokens: their groups come from gidx
        layer.keep(torch.cat([torch.arange(0, 40), torch.arange(50, 100)]))
        assert layer.gidx is not None
    layer.append(*torch.randn(2, 2, 1, 32, dtype=B16), torch.tensor([100]))  # this step's token, raw
    assert layer.n_compressed > 32 and layer.raw.length >= 1
    q = torch.randn(1, 4, 32, dtype=B16)
    k, v = layer.view()  # the reference: the codes dequantized, then the raw window
    out = triton_kivi.kivi_layer_attention(q, layer)
    assert close(out, exact_attention(q, k, v, None), 2**-6)
    chunked = triton_kivi.kivi_attention(q, layer.tok, layer.grp, layer.gidx, bits, 32, 16, *layer.raw.view(), 32)
    assert close(chunked, exact_attention(q, k, v, None), 2**-6)  # several chunks of codes and of the window


@pytest.mark.parametrize("chunk", [None, 32])
def test_mustafar_attention_reads_the_bitmaps_as_the_cache_holds_them(chunk):
    from workbench.cache.mustafar import MustafarCodec, MustafarLayerCache
    from workbench.kernels import triton_mustafar

    torch.manual_seed(6)
    layer = MustafarLayerCache(MustafarCodec(32, 0.6, B16), 2, 32, B16, CPU, 256, residual=8)
    layer.append(*torch.randn(2, 2, 90, 32, dtype=B16), torch.arange(90))
    layer.commit()  # 82 tokens pruned to 13 of 32 channels, 8 dense
    layer.append(*torch.randn(2, 2, 1, 32, dtype=B16), torch.tensor([90]))
    assert layer.n_compressed == 82 and layer.codec.kept == 13
    q = torch.randn(1, 4, 32, dtype=B16)
    reference = layer.attend(q[0].unsqueeze(1), None).transpose(0, 1).reshape(1, -1)  # the torch SpMV reference
    k, v = layer.view()
    ours = triton_mustafar.mustafar_layer_attention(q, layer) if chunk is None else \
        triton_mustafar.mustafar_attention(q, layer.tok, *layer.raw.view(), chunk)
    assert close(ours, exact_attention(q, k, v, None), 2**-6) and close(ours, reference.double(), 2**-6)


@pytest.mark.parametrize("shape", [(8, 96), (3, 200), (5, 512)])  # one partial tile; blocks of 200; 2 per row
def test_dfloat11_decodes_bit_for_bit_in_the_triton_kernel(shape):
    from workbench.compression.dfloat11 import DFloat11Linear
    from workbench.kernels import triton_dfloat11

    torch.manual_seed(7)
    w = (torch.randn(*shape) * 0.05).to(B16)
    w[0, :4] = torch.tensor([0.0, -0.0, 3e38, -1e-38])  # rare exponents: the longest codes
    layer = DFloat11Linear(w, None)
    ours = triton_dfloat11.decode_bf16(layer.words, layer.offsets, layer.first, layer.entry, layer.block,
                                       layer.sign_mantissa)
    assert torch.equal(ours.view(torch.int16).view(shape), w.view(torch.int16))
    assert torch.equal(triton_dfloat11.lookup_table(layer.first, layer.entry).long() & 0xFFFF, layer.lut())
    with dispatch.recording() as used:  # forced to Triton (the fixture): the layer decodes with it, not simulated
        assert layer.decoder() == "triton" and not layer.simulated
        ids = torch.tensor([shape[0] - 1, 0])
        assert torch.equal(layer.rows(ids).view(torch.int16), w[ids].view(torch.int16))
    assert dispatch.backends_used(used) == {"dfloat11_decode": "triton"}


@pytest.mark.parametrize("cache,operation", [("kivi:bits=2,group=8,channels=8,residual=8", "kivi_attention"),
                                             ("mustafar:sparsity=0.5,residual=4", "mustafar_attention")])
def test_a_compressed_cache_attends_through_its_kernel_in_a_whole_run(monkeypatch, cache, operation):
    """Greedy tokens of a whole run with the one-token steps' attention read from the codes / bitmaps by the
    kernel are the reference path's (float32: the kernels' rounding cannot flip a choice), and the run's
    provenance says which ran. Only the compressed attention is interpreted (the rest would only slow it)."""
    from workbench.api import Workbench

    monkeypatch.setattr(backend_triton, "OPERATIONS", dispatch.LAYER_ATTENTION_OPERATIONS)

    def run(force: str):
        monkeypatch.setenv("WORKBENCH_KERNELS", force)
        dispatch.reset()
        trace = Workbench("random:llama", dtype="float32").generate(
            " ".join(str(i) for i in range(5, 21)), f"cache={cache};max_new_tokens=6;ignore_eos=true")
        return trace.token_ids, trace.summary()["provenance"]["backends"]

    ours, used = run("triton")
    reference, used_reference = run("torch")
    assert used[operation] == "triton" and operation not in used_reference
    assert len(ours) == 6 and ours == reference
