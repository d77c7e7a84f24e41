"""FP4 (LLM-FP4) and MX block formats: the element formats, packing, LLM-FP4's search, the MX conversion rule,
real bytes, refusals, and decoding with a drafter."""

import pytest
import torch

from workbench.compression.base import apply_compression, linear_sites, model_weight_bytes
from workbench.compression.formats import FORMATS, ScaledCodeLinear, pack_codes, unpack_codes
from workbench.compression.fp4 import fp4_search
from workbench.compression.mx import BLOCK, MX_FORMATS, mx_quantize
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import PROMPTS
from .test_gptq import loaded

pytestmark = pytest.mark.usefixtures("one_thread")


def test_element_formats_have_the_standard_values():
    assert FORMATS["e2m1"].magnitudes().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert FORMATS["e1m2"].magnitudes().tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]
    assert FORMATS["e3m0"].magnitudes().tolist() == [0, 0.25, 0.5, 1, 2, 4, 8, 16]
    # OCP MX v1.0, table 2 (largest normal, smallest subnormal) and MXINT8's implicit 2^-6 scale.
    for name, largest, smallest in [("e2m3", 7.5, 0.125), ("e3m2", 28, 0.0625), ("e4m3", 448, 2 ** -9),
                                    ("e5m2", 57344, 2 ** -16), ("int8", 127 / 64, 1 / 64)]:
        m = FORMATS[name].magnitudes()
        assert (float(m[-1]), float(m[1])) == (largest, smallest)
    assert [FORMATS[n].emax for n in ("e2m1", "e2m3", "e3m2", "e4m3", "e5m2", "int8")] == [2, 2, 4, 8, 15, 0]


@pytest.mark.parametrize("name", list(FORMATS))
def test_codes_round_trip_and_round_to_nearest(name):
    fmt = FORMATS[name]
    table = fmt.table()
    values = fmt.magnitudes()
    values = torch.cat((values, -values[1:]))
    assert torch.equal(table[fmt.encode(values).long()], values)
    x = torch.randn(2000) * fmt.max_value / 2
    decoded = table[fmt.encode(x).long()]
    nearest = table[(x[:, None] - table[None, :]).abs().argmin(1)]  # int8 also has -128
    assert torch.allclose((decoded - x).abs(), (nearest - x).abs())
    assert float(table[fmt.encode(torch.tensor([1e9])).long()]) == fmt.max_value  # saturates


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_packing_is_dense_and_lossless(bits):
    codes = torch.randint(0, 2 ** bits, (6, 40), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (6, 40 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 40), codes)
    assert torch.equal(unpack_codes(packed[[4, 1]], bits, 40), codes[[4, 1]])


def test_fp4_search_finds_the_format_the_weights_come_from():
    g = torch.Generator().manual_seed(0)
    for name in ("e2m1", "e1m2", "e3m0"):
        fmt = FORMATS[name]
        codes = torch.randint(0, 16, (32, 64), generator=g)
        codes[:, 0] = 7  # the largest magnitude: every row reaches its scale's maximum
        w = fmt.table()[codes] * (0.1 + torch.rand(32, 1, generator=g))
        found, codes, scales = fp4_search(w, [FORMATS[f] for f in ("e2m1", "e1m2", "e3m0")], 64,
                                          torch.linspace(0.5, 1, 11))
        assert found.name == name
        w_hat = found.table()[codes.long()] * scales.float()
        assert torch.allclose(w_hat, w, rtol=2e-3, atol=1e-6)


def test_fp4_clipping_search_lowers_the_error_and_follows_the_activation_weights():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    fmts = [FORMATS["e2m1"]]
    importance = torch.logspace(0, -3, 128)

    def weighted_error(result, weights):
        fmt, codes, scales = result
        w_hat = fmt.table()[codes.long()].view(64, -1, 32) * scales.float()[..., None]
        return float((((w_hat.view(64, 128) - w) ** 2) * weights).sum())

    no_clip = fp4_search(w, fmts, 32, torch.ones(1))
    searched = fp4_search(w, fmts, 32, torch.linspace(0.5, 1, 16))
    calibrated = fp4_search(w, fmts, 32, torch.linspace(0.5, 1, 16), importance)
    ones = torch.ones(128)
    assert weighted_error(searched, ones) < weighted_error(no_clip, ones)
    assert weighted_error(calibrated, importance) < weighted_error(searched, importance)


def test_mx_follows_the_spec_conversion():
    """Shared exponent = floor(log2(max|v|)) - emax; values on the element grid times 2^k convert exactly."""
    g = torch.Generator().manual_seed(2)
    for name in ("fp4", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2", "int8"):
        fmt = FORMATS[MX_FORMATS[name]]
        exps = torch.randint(-6, 6, (4, 3), generator=g)
        codes = torch.randint(0, len(fmt.magnitudes()), (4, 3, BLOCK), generator=g)
        codes[..., 0] = len(fmt.magnitudes()) - 1  # the largest magnitude sets the exponent
        w = (fmt.magnitudes()[codes] * torch.exp2(exps.float())[..., None]).view(4, 3 * BLOCK)
        got_codes, scale_bytes = mx_quantize(w, fmt)
        expected = torch.floor(torch.log2(fmt.magnitudes()[-1])) - fmt.emax + exps + 127
        assert torch.equal(scale_bytes.long(), expected.long())
        w_hat = (fmt.table()[got_codes.long()].view(4, 3, BLOCK) * torch.exp2(scale_bytes.float() - 127)[..., None])
        assert torch.equal(w_hat.view(4, -1), w)


@pytest.mark.parametrize("spec, bits", [("fp4", 4), ("fp4:format=e3m0,group=32", 4), ("mx:format=fp4", 4),
                                        ("mx:format=fp6_e3m2", 6), ("mx:format=fp8_e4m3", 8), ("mx:format=int8", 8)])
def test_bytes_are_the_real_packed_codes_and_scales(spec, bits):
    lm = loaded()
    before = model_weight_bytes(lm.model)
    (report,) = apply_compression(lm, [TechniqueSpec.parse(spec)])
    assert report.simulated and report.layers == 16
    saved = 0
    for site in linear_sites(lm.model, head=False):
        m = site.module
        assert isinstance(m, ScaledCodeLinear)
        assert m.packed.numel() == m.out_features * m.in_features * bits // 8
        held = sum(t.numel() * t.element_size() for t in m.buffers())
        assert m.weight_nbytes() == held
        saved += m.out_features * m.in_features * 4 - held
        x = torch.randn(3, m.in_features)
        assert torch.equal(m(x), torch.nn.functional.linear(x, m.dequantized_weight(), m.bias))
    assert model_weight_bytes(lm.model) == before - saved == report.bytes_after


@pytest.mark.parametrize("spec", ["fp4:head=true", "mx:format=fp6_e2m3,head=true"])
def test_a_tied_head_is_held_once_and_its_rows_decode_alone(spec):
    lm = loaded("smollm")
    apply_compression(lm, [TechniqueSpec.parse(spec)])
    head = lm.model.lm_head
    assert isinstance(head, ScaledCodeLinear) and lm.model.embed.head is head
    ids = torch.tensor([0, 17, 511])
    assert torch.equal(head.rows(ids), head.dequantized_weight()[ids])


def test_fp4_and_mx_refuse_what_does_not_fit():
    with pytest.raises(SpecError, match=r"fp4: group=48 does not divide layers\.0\.qkv's 64 inputs.*valid groups"):
        apply_compression(loaded(), [TechniqueSpec.parse("fp4:group=48")])
    with pytest.raises(SpecError, match=r"mx: group=32 does not divide layers\.0\.qkv's 80 inputs"):
        apply_compression(loaded(hidden_size=80), [TechniqueSpec.parse("mx")])
    with pytest.raises(SpecError, match="format='e4m4' is not allowed.*e2m1/e1m2/e3m0"):
        TechniqueSpec.parse("fp4:format=e4m4").validated("compression")
    with pytest.raises(SpecError, match="fp8_e4m3"):
        TechniqueSpec.parse("mx:format=fp5").validated("compression")


@pytest.mark.parametrize("spec", ["fp4", "mx:format=fp6_e2m3"])
@pytest.mark.parametrize("decode", ["draft_model:layers=2", "prompt_lookup"])
def test_fp4_and_mx_models_decode_the_same_with_a_drafter(spec, decode):
    lm = loaded()
    apply_compression(lm, [TechniqueSpec.parse(spec)])
    plain = [[t for e in Engine(lm.model, RunSpec(max_new_tokens=24)).run(p) for t in e.tokens] for p in PROMPTS]
    drafted = RunSpec(max_new_tokens=24, decode=TechniqueSpec.parse(decode))
    assert [[t for e in Engine(lm.model, drafted).run(p) for t in e.tokens] for p in PROMPTS] == plain
