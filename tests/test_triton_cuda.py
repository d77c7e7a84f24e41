"""The Triton kernels compiled for a CUDA GPU: every operation of kernels/backend_triton.py on the dispatch
test's inputs against the exact result, the quantized-cache kernels against their caches' reference, and a
model whose kernels dispatch picks on CUDA. Runs where a GPU is present (scripts/gpu_check.sh kernels); without
one it is skipped, and tests/test_triton_kernels.py checks the same kernels in Triton's interpreter."""

import pytest
import torch

from .test_kernel_dispatch import case, close, exact_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton = pytest.importorskip("triton")


def cuda(x):
    if isinstance(x, torch.Tensor):
        return x.cuda()
    return tuple(cuda(t) for t in x) if isinstance(x, tuple) else x


@pytest.mark.parametrize("operation", ["linear_int8", "linear_int4", "attention", "tree_attention", "rms_norm",
                                       "add_rms_norm", "rope", "rope_append", "swiglu"])
def test_each_triton_operation_on_the_gpu(operation):
    from workbench.kernels import backend_triton

    assert not backend_triton.interpreting() and backend_triton.supports(operation, torch.device("cuda"),
                                                                         torch.bfloat16)
    args, exact = case(operation, backend_triton)
    args = tuple(cuda(a) for a in args)
    assert getattr(backend_triton, f"{operation}_fits")(*args)
    ours = getattr(backend_triton, operation)(*args)
    if operation == "add_rms_norm":
        assert close(ours[0].cpu(), exact[0]) and close(ours[1].cpu(), exact[1])
    elif operation == "rope_append":  # q returned, k and v written into the cache buffers passed in
        assert close(ours.cpu(), exact[0]) and close(args[3].cpu(), exact[1]) and close(args[4].cpu(), exact[2], 0)
    else:
        assert close(ours.cpu(), exact, 2**-6 if "attention" in operation else 2**-7)


def test_quantized_cache_kernels_on_the_gpu():
    from workbench.cache.kivi import KiviCodec
    from workbench.cache.mustafar import MustafarCodec, MustafarLayerCache
    from workbench.cache.quantized import CompressedLayerCache
    from workbench.kernels import triton_kivi, triton_mustafar

    dev, b16 = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    q = torch.randn(1, 8, 64, dtype=b16, device=dev)
    for layer in (CompressedLayerCache(KiviCodec(2, 32, 32), 2, 64, b16, dev, 512, residual=32),
                  MustafarLayerCache(MustafarCodec(64, 0.5, b16), 2, 64, b16, dev, 512, residual=16)):
        layer.append(*torch.randn(2, 2, 300, 64, dtype=b16, device=dev), torch.arange(300, device=dev))
        layer.commit()
        layer.append(*torch.randn(2, 2, 1, 64, dtype=b16, device=dev), torch.tensor([300], device=dev))
        k, v = layer.view()
        kernel = triton_kivi.kivi_layer_attention if isinstance(layer.codec, KiviCodec) else \
            triton_mustafar.mustafar_layer_attention
        assert close(kernel(q, layer).cpu(), exact_attention(q.cpu(), k.cpu(), v.cpu(), None), 2**-6)


def test_a_model_on_the_gpu_runs_the_triton_kernels():
    from workbench.engine import build_cache
    from workbench.kernels import dispatch
    from workbench.models.random import random_model

    dispatch.reset()
    model = random_model("smollm", dtype=torch.bfloat16).cuda()
    cache = build_cache(model, [], 64)
    with dispatch.recording() as used, torch.inference_mode():
        model(torch.arange(8, device="cuda"), torch.arange(8, device="cuda"), cache)
        cache.commit()
        model(torch.tensor([3], device="cuda"), torch.tensor([8], device="cuda"), cache)
    ran = dispatch.backends_used(used)
    assert {op for op, name in ran.items() if name == "triton"} >= {"rms_norm", "rope_append", "swiglu",
                                                                      "attention"}, ran


def test_dfloat11_decodes_on_the_gpu_bit_for_bit():
    from workbench.compression.dfloat11 import DFloat11Linear

    w = (torch.randn(256, 512) * 0.05).to(torch.bfloat16)
    layer = DFloat11Linear(w, None).cuda()
    assert layer.decoder() == "triton" and not layer.simulated
    assert torch.equal(layer.dequantized_weight().cpu().view(torch.int16), w.view(torch.int16))


@pytest.mark.parametrize("cache,operation", [("kivi:bits=2,group=8,channels=8,residual=8", "kivi_attention"),
                                             ("mustafar:sparsity=0.5,residual=4", "mustafar_attention")])
def test_compressed_caches_attend_through_their_kernels_on_the_gpu(monkeypatch, cache, operation):
    from workbench.api import Workbench
    from workbench.kernels import dispatch

    def run(force: str):
        monkeypatch.setenv("WORKBENCH_KERNELS", force)
        dispatch.reset()
        trace = Workbench("random:llama", dtype="float32", device="cuda").generate(
            " ".join(str(i) for i in range(5, 45)), f"cache={cache};max_new_tokens=16;ignore_eos=true")
        return trace.token_ids, trace.summary()["provenance"]["backends"]

    ours, used = run("triton")
    reference, used_reference = run("torch")
    dispatch.reset()
    assert used[operation] == "triton" and operation not in used_reference
    assert ours == reference


GRAPH_PROMPT = " ".join(str(i) for i in [5, 6, 7, 8, 9, 10] * 3)  # repeats, so prompt lookup drafts


def graph_run(decode: str, graphs: str):
    from workbench.api import Workbench

    trace = Workbench("random:llama", dtype="float32", device="cuda").generate(
        GRAPH_PROMPT, f"decode={decode};graphs={graphs};max_new_tokens=16;ignore_eos=true")
    return trace.token_ids, trace.summary()["provenance"]["graphs"]


@pytest.mark.parametrize("decode", ["plain", "prompt_lookup:k=4"])
def test_cuda_graphs_replay_the_static_step_with_the_eager_tokens(decode):
    eager, off = graph_run(decode, "off")
    replayed, auto = graph_run(decode, "auto")
    assert off["ran"] == "off" and auto["ran"] == "cuda graphs" and auto["static_steps"] > 0, auto
    assert replayed == eager


def test_torch_compile_reduce_overhead_runs_the_static_step_with_the_eager_tokens():
    eager, _ = graph_run("plain", "off")
    compiled, report = graph_run("plain", "compile")
    assert report["ran"] == "torch.compile reduce-overhead" and report["static_steps"] == 15, report
    assert compiled == eager
