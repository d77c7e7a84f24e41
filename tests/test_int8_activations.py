"""`act=int8` on the int8 and int4 transforms: inputs rounded to int8 per block of 32, integer dot products
(kernels/cpu_gemm.c, `*_a8`). The C kernels quantize exactly as the torch reference does, their products are
the exact product of those activations within one bf16 rounding, a row gets the same bits whatever the row
count (so lossless drafters stay token-identical), and bad specs say what is valid."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench import Workbench
from workbench.compression.base import LinearSite, check_int8_activations
from workbench.compression.int4 import Int4Linear, quantize_rtn_int4
from workbench.compression.int8 import Int8Linear, quantize_int8
from workbench.errors import SpecError
from workbench.kernels import backend_torch, cpu, dispatch

needs_int8_dot = pytest.mark.skipif(not cpu.int8_dot_available(),
                                    reason="no C compiler, or no AVX512-VNNI and VBMI on this CPU")
B16 = torch.bfloat16
A8 = {"int8_activations": True}


def exact(x_hat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x_hat.double() @ weight.double().T


def within_a_rounding(y: torch.Tensor, expected: torch.Tensor) -> bool:
    """Within one bf16 rounding of the output's magnitude (and float32 sums' error)."""
    return bool((y.double() - expected).abs().max() <= 2**-8 * expected.abs().max())


@needs_int8_dot
def test_the_kernels_quantize_activations_as_the_reference_does():
    torch.manual_seed(0)
    x = torch.randn(4, 96, dtype=B16) * torch.tensor([1.0, 30.0, 1e-3, 0.0]).to(B16)[:, None]  # one row all zeros
    x[0, 5] = 50.0  # an outlier in one block: its block's scale, not the row's
    codes, scales, sums = cpu.quantize_rows_q8(x)
    assert codes.abs().max() <= 127 and torch.equal(sums, codes.view(4, 3, 32).sum(-1, dtype=torch.int32))
    assert torch.equal(scales[3], torch.zeros(3)) and not codes[3].any()
    values = (codes.float().view(4, 3, 32) * scales[..., None]).view(4, 96)
    assert torch.equal(values, backend_torch.quantize_activations(x))
    assert (values - x.float()).abs().max() <= scales.max() / 2 + 1e-6  # round to nearest on each block's grid


@needs_int8_dot
@pytest.mark.parametrize("n,k", [(960, 576), (48, 64)])
def test_int8_weights_times_int8_activations(n, k):
    torch.manual_seed(1)
    codes, scales = quantize_int8(torch.randn(n, k) * 0.05, B16)
    packed, bias = cpu.pack_int8(codes), torch.randn(n, dtype=B16)
    weight = codes.double() * scales.double()[:, None]
    x = torch.randn(7, k, dtype=B16)
    y = cpu.gemm_int8(x, packed, scales.float(), bias, **A8)
    assert within_a_rounding(y, exact(backend_torch.quantize_activations(x), weight) + bias.double())
    rows = torch.cat([cpu.gemm_int8(x[i:i + 1], packed, scales.float(), bias, **A8) for i in range(7)])
    assert torch.equal(rows, y)  # a row's bits do not depend on the others
    # and it is not the float-activation product: the rounding of the activations shows
    assert not torch.equal(y, cpu.gemm_int8(x, packed, scales.float(), bias))


@needs_int8_dot
@pytest.mark.parametrize("group", [32, 64])
def test_int4_weights_times_int8_activations(group):
    torch.manual_seed(2)
    codes, scales, offsets = quantize_rtn_int4(torch.randn(96, 192) * 0.05, group, B16)
    packed, params = cpu.pack_int4(codes, scales.to(B16), offsets.to(B16))
    s, o = (t.double().repeat_interleave(group, 1) for t in cpu.int4_params(params))
    x = torch.randn(5, 192, dtype=B16)
    y = cpu.gemm_int4(x, packed, params, group, None, **A8)
    assert within_a_rounding(y, exact(backend_torch.quantize_activations(x), codes.double() * s + o))
    assert torch.equal(torch.cat([cpu.gemm_int4(x[i:i + 1], packed, params, group, None, **A8) for i in range(5)]), y)


@needs_int8_dot
def test_the_layers_pick_the_integer_kernels_and_agree_with_the_reference():
    torch.manual_seed(3)
    w, x = torch.randn(64, 128) * 0.05, torch.randn(3, 128, dtype=B16)
    for layer in (Int8Linear(*quantize_int8(w, B16), None, int8_activations=True),
                  Int4Linear.from_affine(*quantize_rtn_int4(w, 32, B16), 32, None, B16, int8_activations=True)):
        with dispatch.recording() as used, torch.inference_mode():
            y = layer(x)
        assert set(dispatch.backends_used(used).values()) == {"c"} and "_a8" in next(iter(used))[0]
        assert layer.kernel_weights().int8_activations
        # against the dequantized weight, which is rounded to bf16: a few roundings apart
        reference = exact(backend_torch.quantize_activations(x), layer.dequantized_weight())
        assert (y.double() - reference).abs().max() <= 2**-6 * reference.abs().max()
        with torch.inference_mode():  # the layer's own dense path rounds the activations too
            dense = super(type(layer), layer).forward(x)
        assert torch.equal(dense, F.linear(backend_torch.quantize_activations(x).to(B16), layer.dequantized_weight()))
        assert (layer(x.float()).double() - reference).abs().max() <= 2**-6 * reference.abs().max()  # float32


@needs_int8_dot
@pytest.mark.parametrize("compress", ["int8:act=int8", "int4:group=32,head=true,act=int8"])
def test_drafters_stay_token_identical_to_plain_decoding(compress):
    wb = Workbench("random:smollm", dtype="bfloat16", device="cpu")
    prompt = "5 6 7 8 9 5 6 7 8 9 5 6 7"
    plain = wb.generate(prompt, f"compress={compress};max_new_tokens=24")
    for drafter in ("prompt_lookup", "token_recycling"):
        ours = wb.generate(prompt, f"compress={compress};decode={drafter};max_new_tokens=24")
        assert ours.token_ids == plain.token_ids, drafter


def test_bad_specs_say_what_is_valid():
    wb = Workbench("random:smollm", dtype="float32", device="cpu")
    with pytest.raises(SpecError, match="act.*float.*int8"):
        wb.generate("1 2", "compress=int8:act=int4;max_new_tokens=2")
    layers = [m for m in wb.model(wb.spec("compress=int8:act=int8")).model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.int8_activations for m in layers)  # float32 runs the reference path, rounding alike
    odd = LinearSite("layers.0.o", nn.Module(), "o", nn.Linear(48, 16))
    with pytest.raises(SpecError, match="blocks of 32.*48 inputs.*act=float"):
        check_int8_activations("int4", [odd])
