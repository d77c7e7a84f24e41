"""GPTQ: lower output error than round-to-nearest on correlated inputs, the sequential calibration pass, Int4Linear
output, refusals, and composition with drafters."""

import pytest
import torch

from workbench.compression.base import apply_compression, linear_sites, model_weight_bytes
from workbench.compression.calibration import layerwise, second_moments
from workbench.compression.gptq import gptq_quantize
from workbench.compression.int4 import Int4Linear, quantize_rtn_int4
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.models import LoadedModel
from workbench.models.random import random_model
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import PROMPTS

pytestmark = pytest.mark.usefixtures("one_thread")


def loaded(variant: str = "llama", **overrides) -> LoadedModel:
    """A tiny model whose greedy output varies (weights scaled up as in `varied_model`), ready to compress."""
    model = random_model(variant, seed=7, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return LoadedModel(model, None, model.config, "tiny", "tiny", torch.float32, torch.device("cpu"))


def correlated_layer(seed: int = 0, out_f: int = 96, in_f: int = 128, n: int = 2048):
    """A random weight and inputs whose channels are mixed and scaled over two decades (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(n, in_f, generator=g) @ (torch.randn(in_f, in_f, generator=g) * torch.logspace(0, -2, in_f))
    return w, x


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - w_hat).T) ** 2).mean())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_well_below_round_to_nearest(act_order):
    w, x = correlated_layer()
    codes, scales, offsets = gptq_quantize(w, x.T @ x / len(x), 4, 32, act_order=act_order)
    gptq = Int4Linear.from_affine(codes, scales, offsets, 32, None, torch.float32).dequantized_weight()
    rtn = Int4Linear.from_affine(*quantize_rtn_int4(w, 32), 32, None, torch.float32).dequantized_weight()
    assert int(codes.max()) <= 15
    assert output_error(w, gptq, x) < 0.6 * output_error(w, rtn, x)


def test_fewer_bits_use_fewer_codes_and_cost_accuracy():
    w, x = correlated_layer()
    h = x.T @ x / len(x)
    errors = []
    for bits in (2, 3, 4):
        codes, scales, offsets = gptq_quantize(w, h, bits, 32)
        assert int(codes.max()) <= 2 ** bits - 1
        errors.append(output_error(w, Int4Linear.from_affine(codes, scales, offsets, 32, None, torch.float32)
                                   .dequantized_weight(), x))
    assert errors[0] > errors[1] > errors[2]


def test_gptq_without_correlation_stays_on_the_round_to_nearest_grid():
    """With H = I there is nothing to compensate across columns beyond the rounding itself: every weight lands
    within one grid step of its round-to-nearest value, and the error is of the same size."""
    w, _ = correlated_layer()
    codes, scales, offsets = gptq_quantize(w, torch.eye(128), 4, 32, percdamp=0.0)
    rtn_codes, _, _ = quantize_rtn_int4(w, 32)
    assert (codes.int() - rtn_codes.int()).abs().max() <= 1
    gptq = Int4Linear.from_affine(codes, scales, offsets, 32, None, torch.float32).dequantized_weight()
    rtn = Int4Linear.from_affine(*quantize_rtn_int4(w, 32), 32, None, torch.float32).dequantized_weight()
    assert ((w - gptq) ** 2).mean() < 1.5 * ((w - rtn) ** 2).mean()


def test_second_moments_are_the_inputs_gram_matrix():
    lm = loaded()
    site = linear_sites(lm.model, head=False)[1]  # layers.0.o
    ids = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(1))
    seen = []
    handle = site.module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    lm.model(ids, torch.arange(40))
    handle.remove()
    h = second_moments(lm.model, [site], ids)[site.name]
    assert torch.allclose(h, seen[0].T @ seen[0] / 40, atol=1e-6)


def test_layerwise_calibrates_each_layer_on_the_transformed_layers_before_it():
    """Zeroing layer 0's output projection changes what layer 1 sees: the sequential pass must see that."""
    lm = loaded()
    sites = linear_sites(lm.model, head=True)
    ids = torch.randint(3, 500, (64,), generator=torch.Generator().manual_seed(2))
    plain = second_moments(lm.model, sites, ids)
    seen: dict[str, torch.Tensor] = {}

    def zero_layer_0(layer_sites, hessians):
        seen.update(hessians)
        for s in layer_sites:
            if s.name == "layers.0.down":
                s.module.weight.zero_()

    layerwise(lm.model, sites, ids, zero_layer_0)
    assert set(seen) == {s.name for s in sites}
    assert torch.allclose(seen["layers.0.qkv"], plain["layers.0.qkv"], atol=1e-5)
    assert not torch.allclose(seen["layers.1.qkv"], plain["layers.1.qkv"], atol=1e-3)


def test_gptq_transform_beats_round_to_nearest_on_a_tiny_model():
    reference = loaded()
    ids = torch.randint(3, 500, (64,), generator=torch.Generator().manual_seed(3))
    want = reference.model(ids, torch.arange(64)).logits
    errors = {}
    for spec in ("int4:group=32", "gptq:group=32,tokens=512"):
        lm = loaded()
        (report,) = apply_compression(lm, [TechniqueSpec.parse(spec)])
        assert report.layers == 16 and report.bytes_after < report.bytes_before
        assert all(isinstance(s.module, Int4Linear) for s in linear_sites(lm.model, head=False))
        errors[spec] = float(((lm.model(ids, torch.arange(64)).logits - want) ** 2).mean())
    assert errors["gptq:group=32,tokens=512"] < errors["int4:group=32"]


def test_gptq_compresses_a_tied_head_and_embedding():
    lm = loaded("smollm")
    before = model_weight_bytes(lm.model)
    apply_compression(lm, [TechniqueSpec.parse("gptq:group=32,tokens=256,head=true,act_order=true")])
    assert isinstance(lm.model.lm_head, Int4Linear)
    assert model_weight_bytes(lm.model) < 0.4 * before
    assert torch.isfinite(lm.model(torch.tensor([5, 6, 7]), torch.arange(3)).logits).all()


def test_gptq_refuses_groups_that_do_not_fit_and_a_second_quantizer():
    with pytest.raises(SpecError, match=r"group=128 does not divide layers\.0\.qkv's 64 inputs.*valid groups here"):
        apply_compression(loaded(), [TechniqueSpec.parse("gptq:group=128")])
    with pytest.raises(SpecError, match=r"group=48 is not allowed.*32/64/128/256"):
        TechniqueSpec.parse("gptq:group=48").validated("compression")
    with pytest.raises(SpecError, match="bits"):
        TechniqueSpec.parse("gptq:bits=5").validated("compression")
    with pytest.raises(SpecError, match="both quantizers"):
        apply_compression(loaded(), [TechniqueSpec.parse("int4"), TechniqueSpec.parse("gptq")])


@pytest.mark.parametrize("decode", ["draft_model:layers=2", "prompt_lookup"])
def test_a_gptq_model_decodes_the_same_with_a_drafter(decode):
    lm = loaded()
    apply_compression(lm, [TechniqueSpec.parse("gptq:group=32,tokens=256")])
    plain = [[t for e in Engine(lm.model, RunSpec(max_new_tokens=24)).run(p) for t in e.tokens] for p in PROMPTS]
    spec = RunSpec(max_new_tokens=24, decode=TechniqueSpec.parse(decode))
    drafted = [[t for e in Engine(lm.model, spec).run(p) for t in e.tokens] for p in PROMPTS]
    assert drafted == plain
