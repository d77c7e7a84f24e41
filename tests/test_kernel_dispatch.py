"""The kernel seam (kernels/dispatch.py): every operation of every backend that runs here against the torch
reference computed in float64, the choice of backend per device, dtype and WORKBENCH_KERNELS, the fallback to the
reference where a backend does not take the inputs, what a run records, and a backend added as one module."""

import types

import pytest
import torch
import torch.nn.functional as F

from workbench.compression.int4 import quantize_rtn_int4
from workbench.compression.int8 import quantize_int8
from workbench.kernels import backend_torch, cpu, dispatch

CPU = torch.device("cpu")
# Triton's kernels take CPU tensors only in its interpreter (TRITON_INTERPRET=1 from the start of the process):
# tests/test_triton_kernels.py runs this module's Triton cases so in a subprocess; on CUDA, tests/test_cuda.py.
BACKENDS = dispatch.available_backends()
TRITON = dispatch.backend("triton")


@pytest.fixture(autouse=True)
def fresh_resolution():
    dispatch.reset()
    yield
    dispatch.reset()


def close(ours: torch.Tensor, exact: torch.Tensor, rel: float = 2**-7) -> bool:
    """Within a couple of bf16 roundings of the exact value, relative to the output's magnitude."""
    return bool((ours.double() - exact).abs().max() <= rel * exact.abs().max() + 1e-6)


def exact_attention(q, k, v, mask):
    """q [T, H, D], k, v [KV, S, D], mask [T, S] bool or None -> [T, H * D] float64."""
    group = q.shape[1] // k.shape[0]
    k, v = k.double().repeat_interleave(group, 0), v.double().repeat_interleave(group, 0)
    scores = torch.einsum("thd,hsd->hts", q.double(), k) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hts,hsd->thd", scores.softmax(-1), v).reshape(q.shape[0], -1)


def tree_mask(n):
    mask = torch.eye(n, dtype=torch.bool)
    mask[:, 0] = True
    mask[3, 1] = True  # node 3 hangs under node 1
    return mask


def case(operation: str, module):
    """(arguments for `module`'s operation, the exact result in float64) on small shapes, bf16 on the CPU."""
    torch.manual_seed(0)
    b16 = torch.bfloat16
    x = torch.randn(3, 96, dtype=b16)
    w, bias = torch.randn(64, 96, dtype=b16) * 0.1, torch.randn(64, dtype=b16)
    if operation == "linear":
        return (x, module.pack_bf16(w), bias), x.double() @ w.double().T + bias.double()
    x_used = backend_torch.quantize_activations(x) if operation.endswith("_a8") else x  # int8 activations
    if operation in ("linear_int8", "linear_int8_a8"):
        codes, scales = quantize_int8(w.float(), b16)
        exact = x_used.double() @ (codes.double() * scales.double()[:, None]).T + bias.double()
        return (x, *module.pack_int8(codes, scales), bias), exact
    if operation in ("linear_int4", "linear_int4_a8"):
        codes, scales, offsets = quantize_rtn_int4(w.float(), 32, b16)
        weight = codes.double() * scales.double().repeat_interleave(32, 1) + offsets.double().repeat_interleave(32, 1)
        exact = x_used.double() @ weight.T + bias.double()
        return (x, *module.pack_int4(codes, scales, offsets, b16), 32, bias), exact
    if operation in dispatch.LAYER_ATTENTION_OPERATIONS:  # a compressed layer after a step's append
        layer, q = compressed_layer(operation), torch.randn(1, 4, 32, dtype=b16)
        return (q, layer), exact_attention(q, *layer.view(), None)
    big_k, big_v = torch.randn(2, 40, 32, dtype=b16), torch.randn(2, 40, 32, dtype=b16)  # a cache's buffers
    if operation == "attention":
        q, k, v = torch.randn(1, 4, 32, dtype=b16), big_k[:, :10], big_v[:, :10]  # strided views, as a cache's
        return (q, k, v), exact_attention(q, k, v, None)
    if operation == "tree_attention":
        q, k, v = torch.randn(5, 4, 32, dtype=b16), big_k[:, :12], big_v[:, :12]
        visible = torch.cat([torch.ones(5, 7, dtype=torch.bool), tree_mask(5)], dim=1)
        return (q, k, v, tree_mask(5), 7), exact_attention(q, k, v, visible)
    if operation == "prefill_attention":
        q, k, v = torch.randn(70, 4, 32, dtype=b16), *torch.randn(2, 2, 70, 32, dtype=b16)
        return (q, k, v, None, 0), exact_attention(q, k, v, torch.ones(70, 70, dtype=torch.bool).tril())
    rows, weight = torch.randn(3, 64, dtype=b16), torch.randn(64, dtype=b16)

    def exact_norm(y):
        return y / (y.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * weight.double()

    if operation == "rms_norm":
        return (rows, weight, 1e-5), exact_norm(rows.double())
    if operation == "add_rms_norm":
        delta = torch.randn(3, 64, dtype=b16)
        total = (rows.double() + delta.double()).to(b16).double()  # the sum, rounded once, is what is normed
        return (rows, delta, weight, 1e-5), torch.stack([total, exact_norm(total)])
    if operation == "rope":
        angles = torch.randn(3, 1, 16).double()
        cos, sin = angles.cos().repeat(1, 1, 2), angles.sin()
        signed_sin = torch.cat([-sin, sin], -1)
        q = torch.randn(3, 4, 32, dtype=b16)
        exact = q.double() * cos + q.double().roll(16, dims=-1) * signed_sin
        return (q, cos.to(b16), signed_sin.to(b16)), exact
    if operation == "rope_append":  # 4 q heads, 2 kv heads; the cache's other slots must stay as they are
        angles = torch.randn(3, 1, 16).double()
        cos, signed_sin = angles.cos().repeat(1, 1, 2), torch.cat([-angles.sin(), angles.sin()], -1)
        qkv = torch.randn(3, 8, 32, dtype=b16)
        rotated = qkv[:, :6].double() * cos + qkv[:, :6].double().roll(16, dims=-1) * signed_sin
        caches = big_k.clone(), big_v.clone()
        exact_k, exact_v = big_k.double(), big_v.double()
        exact_k[:, 5:8], exact_v[:, 5:8] = rotated[:, 4:].transpose(0, 1), qkv[:, 6:].double().transpose(0, 1)
        return (qkv, cos.to(b16), signed_sin.to(b16), *caches, 5), (rotated[:, :4], exact_k, exact_v)
    if operation == "swiglu":
        gate_up = torch.randn(3, 128, dtype=b16)
        gate, up = gate_up.double().chunk(2, -1)
        return (gate_up,), F.silu(gate) * up
    if operation == "topk":
        logits = torch.randn(4, 300)
        return (logits, 5), torch.topk(logits.double(), 5, dim=-1).values
    raise AssertionError(operation)


def compressed_layer(operation: str):
    """A KIVI (2-bit) or Mustafar (50%) layer of 2 kv heads x 32 dims: 61 tokens, most of them compressed, and
    one step's token appended after them."""
    from workbench.cache.kivi import KiviCodec
    from workbench.cache.mustafar import MustafarCodec, MustafarLayerCache
    from workbench.cache.quantized import CompressedLayerCache

    b16 = torch.bfloat16
    if operation == "kivi_attention":
        layer = CompressedLayerCache(KiviCodec(2, 16, 16), 2, 32, b16, CPU, 128, residual=16)
    else:
        layer = MustafarLayerCache(MustafarCodec(32, 0.5, b16), 2, 32, b16, CPU, 128, residual=8)
    layer.append(*torch.randn(2, 2, 60, 32, dtype=b16), torch.arange(60))
    layer.commit()
    layer.append(*torch.randn(2, 2, 1, 32, dtype=b16), torch.tensor([60]))
    assert layer.n_compressed >= 40 and layer.attention_operation == operation
    return layer


CASES = [(name, op) for name in BACKENDS for op in dispatch.OPERATIONS if op != "decoder_layers"
         and dispatch.backend(name).supports(op, CPU, torch.bfloat16)]


def test_every_backend_that_runs_here_is_tested():
    assert "torch" in BACKENDS and {op for name, op in CASES if name == "torch"} == set(dispatch.OPERATIONS) - {
        "decoder_layers"}
    if "triton" in BACKENDS and TRITON.interpreting():  # every operation the backend takes, on CPU tensors
        assert {op for name, op in CASES if name == "triton"} == set(TRITON.OPERATIONS)
    if cpu.available():  # this project's machines: the C kernels take every operation but prefill attention
        assert {op for name, op in CASES if name == "c"} == set(dispatch.OPERATIONS) - {
            "decoder_layers", "prefill_attention", "rope_append", *dispatch.LAYER_ATTENTION_OPERATIONS}


@pytest.mark.parametrize("name,operation", CASES)
def test_each_operation_of_each_backend_matches_the_exact_result(name, operation):
    check(dispatch.backend(name), operation)


def check(module, operation: str) -> None:
    """`module`'s operation on `case`'s inputs: within a couple of roundings of the exact result and of the
    reference's. Triton's interpreter casts float32 to bf16 by truncation (one ulp where the GPU's rounding
    errs by half), hence its wider bound."""
    name = module.NAME
    tight = 2**-6 if name == "triton" and module.interpreting() else 2**-7
    args, exact = case(operation, module)
    fits = getattr(module, f"{operation}_fits", None)
    assert fits is None or fits(*args)  # the backend takes these inputs itself
    ours = getattr(module, operation)(*args)
    if operation == "topk":
        values, indices = ours
        assert torch.equal(values.double(), exact) and torch.equal(args[0].gather(1, indices), values)
    elif operation == "add_rms_norm":
        assert close(ours[0], exact[0], tight) and close(ours[1], exact[1], tight)
    elif operation == "rope_append":  # q returned; k and v written into the cache buffers passed in
        assert close(ours, exact[0], tight) and close(args[3], exact[1], tight) and close(args[4], exact[2], 0)
    else:
        assert ours.dtype == args[0].dtype and close(ours, exact, 2**-6 if "attention" in operation else tight)
    if name != "torch":  # and agrees with the reference on the same inputs
        reference_args = case(operation, backend_torch)[0]
        reference = getattr(backend_torch, operation)(*reference_args)
        if operation == "rope_append":  # the cache written as the reference's separate RoPE and append write it
            assert torch.equal(args[4], reference_args[4]) and close(args[3], reference_args[3].double(), tight)
        if operation in ("topk", "add_rms_norm"):
            assert all(close(a, b.double(), 2 * tight) for a, b in zip(ours, reference))
        else:
            assert close(ours, reference.double(), 2**-6)


@pytest.mark.skipif(not cpu.available(), reason="the one-call layers are the C backend's; it does not run here")
def test_the_one_call_layers_match_the_reference_layer_by_layer(monkeypatch):
    from workbench.engine import build_cache
    from workbench.models.packed_linear import pack_linears
    from workbench.models.random import random_model

    def logits(force: str):
        monkeypatch.setenv("WORKBENCH_KERNELS", force)
        dispatch.reset()
        model = random_model("smollm", dtype=torch.bfloat16, vocab_size=256, hidden_size=128, intermediate_size=256,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        pack_linears(model)  # the layouts of the forced backend
        cache = build_cache(model, [], 32)
        with dispatch.recording() as used, torch.inference_mode():
            model(torch.arange(10), torch.arange(10), cache)
            cache.commit()
            out = model(torch.tensor([3]), torch.tensor([10]), cache).logits
        return out, dispatch.backends_used(used)

    fused, used_c = logits("c")
    reference, used_torch = logits("torch")
    assert used_c["decoder_layers"] == "c" and used_c["linear"] == "c"  # the step ran its layers in one call
    assert set(used_torch.values()) == {"torch"} and "decoder_layers" not in used_torch
    assert close(fused[0], reference[0].double(), 2**-4)


def test_the_backend_per_device_and_dtype():
    cuda = dispatch.kernels(torch.device("cuda"), torch.bfloat16)  # resolving needs no GPU
    on_triton = set(TRITON.OPERATIONS) if TRITON is not None and not TRITON.interpreting() else set()
    on_triton -= set(dispatch.LINEAR_OPERATIONS.values())  # bound per layer by `dispatch.linear`
    assert {op for op, name in cuda.backends.items() if name == "triton"} == on_triton
    assert cuda.backends["topk"] == cuda.backends["prefill_attention"] == "torch"  # torch's own are the fast ones
    assert cuda.fuses(None, None, None) is False
    fp32 = dispatch.kernels(CPU, torch.float32)
    assert fp32.backends["rms_norm"] == "torch"  # the C kernels are bf16
    assert fp32.backends["topk"] == ("c" if cpu.available() else "torch")  # float32 logits of any model
    bf16 = dispatch.kernels(CPU, torch.bfloat16)
    assert bf16 is dispatch.kernels(CPU, torch.bfloat16)  # resolved once
    expected = "c" if cpu.available() else "torch"
    assert bf16.backends["attention"] == bf16.backends["decoder_layers" if cpu.available() else "rms_norm"] == expected
    assert bf16.backends["prefill_attention"] == "torch"


def test_inputs_a_backend_does_not_take_run_in_the_reference_and_say_so():
    ops = dispatch.kernels(CPU, torch.bfloat16)
    x, weight = torch.randn(3, 64), torch.randn(64)  # float32: not the C kernels' dtype
    with dispatch.recording() as used:
        y = ops.rms_norm(x, weight, 1e-5)
    assert torch.equal(y, backend_torch.rms_norm(x, weight, 1e-5)) and used == {("rms_norm", "torch")}
    if cpu.available():
        with dispatch.recording() as used:
            ops.rms_norm(x.to(torch.bfloat16), weight.to(torch.bfloat16), 1e-5)
        assert used == {("rms_norm", "c")}


def test_forcing_a_backend(monkeypatch):
    monkeypatch.setenv("WORKBENCH_KERNELS", "torch")
    assert set(dispatch.kernels(CPU, torch.bfloat16).backends.values()) == {"torch"}
    assert dispatch.linear("bf16", CPU, torch.bfloat16, 64, 64).name == "torch"
    dispatch.reset()
    monkeypatch.setenv("WORKBENCH_KERNELS", "cuda-magic")
    with pytest.raises(dispatch.KernelError, match="names no backend; use one of c, torch, triton"):
        dispatch.kernels(CPU, torch.bfloat16)
    monkeypatch.setenv("WORKBENCH_KERNELS", "triton")
    if TRITON is None:
        with pytest.raises(dispatch.KernelError, match="module is not installed"):
            dispatch.kernels(CPU, torch.bfloat16)
    elif not TRITON.available():  # installed, compiled for a GPU, and none here
        with pytest.raises(dispatch.KernelError, match="cannot run here: Triton's kernels need a CUDA GPU"):
            dispatch.kernels(CPU, torch.bfloat16)


def test_forcing_c_where_it_cannot_run_is_a_plain_error(monkeypatch):
    monkeypatch.setattr(cpu, "_tried", True)
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_reason", "this CPU lacks AVX512-BF16, which they need (no fix on this machine)")
    monkeypatch.setenv("WORKBENCH_KERNELS", "c")
    with pytest.raises(dispatch.KernelError, match="cannot run here: this CPU lacks AVX512-BF16"):
        dispatch.kernels(CPU, torch.bfloat16)
    monkeypatch.delenv("WORKBENCH_KERNELS")
    assert set(dispatch.kernels(CPU, torch.bfloat16).backends.values()) == {"torch"}  # unforced: the reference


def test_switching_the_c_kernels_off_still_works(monkeypatch):
    monkeypatch.setattr(cpu, "_tried", False)
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_reason", "")
    monkeypatch.setenv("WORKBENCH_CPU_KERNELS", "0")
    assert set(dispatch.kernels(CPU, torch.bfloat16).backends.values()) == {"torch"}
    assert dispatch.linear("int8", CPU, torch.bfloat16, 64, 64).name == "torch"


def test_a_backend_is_one_module(monkeypatch):
    fake = types.ModuleType("workbench.kernels.backend_fake")
    fake.NAME = "fake"
    fake.supports = lambda operation, device, dtype: operation == "swiglu"
    fake.swiglu = lambda gate_up: backend_torch.swiglu(gate_up) * 1  # any implementation of the signature
    fake.swiglu_fits = lambda gate_up: gate_up.shape[-1] <= 128
    monkeypatch.setitem(dispatch._MODULES, "fake", fake.__name__)
    monkeypatch.setitem(dispatch.BACKENDS, "cpu", ("fake", "c", "torch"))
    monkeypatch.setitem(__import__("sys").modules, fake.__name__, fake)
    ops = dispatch.kernels(CPU, torch.bfloat16)
    assert ops.backends["swiglu"] == "fake" and ops.backends["rms_norm"] != "fake"
    with dispatch.recording() as used:
        ops.swiglu(torch.randn(2, 128, dtype=torch.bfloat16))
        ops.swiglu(torch.randn(2, 256, dtype=torch.bfloat16))  # more than it takes: the reference
    assert dispatch.backends_used(used) == {"swiglu": "fake+torch"}


def test_calls_that_need_gradients_run_the_reference(monkeypatch):
    """Kernels have no backward: PV-Tuning and the fine-tunes train through the model, so a call whose inputs
    need gradients takes the reference, and decoding (no gradients) keeps the kernel."""
    fake = types.ModuleType("workbench.kernels.backend_nograd")
    fake.NAME = "nograd"
    fake.supports = lambda operation, device, dtype: operation == "swiglu"
    fake.swiglu = lambda gate_up: backend_torch.swiglu(gate_up.detach())  # a kernel: no autograd graph
    monkeypatch.setitem(dispatch._MODULES, "nograd", fake.__name__)
    monkeypatch.setitem(dispatch.BACKENDS, "cpu", ("nograd", "torch"))
    monkeypatch.setitem(__import__("sys").modules, fake.__name__, fake)
    ops = dispatch.kernels(CPU, torch.float32)
    gate_up = torch.randn(2, 64, requires_grad=True)
    with dispatch.recording() as used:
        ops.swiglu(gate_up).sum().backward()
    assert used == {("swiglu", "torch")} and gate_up.grad is not None and gate_up.grad.abs().sum() > 0
    with dispatch.recording() as used, torch.no_grad():
        ops.swiglu(gate_up)
    assert used == {("swiglu", "nograd")}


def test_runs_in_one_thread_keep_their_records_apart():
    ops = dispatch.kernels(CPU, torch.float32)

    def run(operation):
        for _ in range(2):
            getattr(ops, operation)(torch.randn(2, 64), torch.ones(64), 1e-5) if operation == "rms_norm" else \
                ops.swiglu(torch.randn(2, 64))
            yield

    a, b = set(), set()
    first, second = dispatch.recorded(run("rms_norm"), a), dispatch.recorded(run("swiglu"), b)
    with dispatch.recording() as outer:
        for _ in zip(first, second):  # interleaved steps
            pass
    assert a == {("rms_norm", "torch")} and b == {("swiglu", "torch")} and outer == a | b
