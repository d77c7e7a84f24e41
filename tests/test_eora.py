"""EoRA: the eigenspace projection beats plain SVD of the error, rank helps monotonically, the wrapper's bytes and
outputs, composition after any quantizer, refusals, and decoding with a drafter."""

import pytest
import torch

from workbench.compression.base import apply_compression, linear_sites, weight_nbytes
from workbench.compression.eora import LowRankCompensated, eora_factors
from workbench.compression.int4 import Int4Linear, quantize_rtn_int4
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import PROMPTS
from .test_gptq import correlated_layer, loaded, output_error

pytestmark = pytest.mark.usefixtures("one_thread")


def rtn_error(w: torch.Tensor) -> torch.Tensor:
    w_hat = Int4Linear.from_affine(*quantize_rtn_int4(w, 32), 32, None, torch.float32).dequantized_weight()
    return w - w_hat


def test_eora_beats_plain_svd_of_the_error_at_every_rank_and_improves_with_rank():
    w, x = correlated_layer()
    delta = rtn_error(w)
    h = x.T @ x / len(x)
    u, s, vh = torch.linalg.svd(delta)
    previous = output_error(delta, torch.zeros_like(delta), x)  # no compensation
    for rank in (1, 2, 4, 8, 16, 32, 64):
        b, a = eora_factors(delta, h, rank, percdamp=0.0)
        eora = output_error(delta, b @ a, x)
        svd = output_error(delta, (u[:, :rank] * s[:rank]) @ vh[:rank], x)
        assert eora < svd
        assert eora < previous
        previous = eora


def test_eora_at_full_rank_reconstructs_the_error():
    w, x = correlated_layer(out_f=48, in_f=64)
    delta = rtn_error(w)
    b, a = eora_factors(delta, x.T @ x / len(x), 48, percdamp=0.0)
    assert torch.allclose(b @ a, delta, atol=1e-4)


def test_the_wrapper_adds_the_low_rank_product_and_counts_its_bytes():
    w, _ = correlated_layer()
    inner = Int4Linear.from_affine(*quantize_rtn_int4(w, 32), 32, torch.randn(96), torch.float32)
    a, b = torch.randn(8, 128), torch.randn(96, 8)
    layer = LowRankCompensated(inner, a, b)
    x = torch.randn(5, 128)
    assert torch.allclose(layer(x), inner(x) + x @ a.T @ b.T, atol=1e-4)
    assert torch.allclose(layer(x), x @ layer.dequantized_weight().T + layer.bias, atol=1e-4)
    assert torch.allclose(layer.rows(torch.tensor([3, 7])), layer.dequantized_weight()[[3, 7]], atol=1e-6)
    held = sum(t.numel() * t.element_size() for n, t in [*layer.named_parameters(), *layer.named_buffers()]
               if not n.endswith("bias"))
    assert layer.weight_nbytes() == held == inner.weight_nbytes() + (8 * 128 + 96 * 8) * 4


@pytest.mark.parametrize("quantizer", ["int4:group=32", "gptq:group=32,tokens=256", "fp4", "mx:format=fp4"])
def test_eora_recovers_part_of_any_quantizer_error(quantizer):
    reference = loaded()
    ids = torch.randint(3, 500, (64,), generator=torch.Generator().manual_seed(4))
    want = reference.model(ids, torch.arange(64)).logits
    errors, sizes = [], []
    for chain in ([quantizer], [quantizer, "eora:rank=8,tokens=256"]):
        lm = loaded()
        apply_compression(lm, [TechniqueSpec.parse(t) for t in chain])
        errors.append(float(((lm.model(ids, torch.arange(64)).logits - want) ** 2).mean()))
        sizes.append(sum(weight_nbytes(s.module) for s in linear_sites(lm.model, head=False)))
    assert errors[1] < 0.9 * errors[0]
    adapters = sum(8 * (s.module.in_features + s.module.out_features) * 4 for s in linear_sites(lm.model, False))
    assert sizes[1] == sizes[0] + adapters


def test_eora_leaves_layers_nothing_compressed_alone_and_wraps_a_tied_head():
    lm = loaded("smollm")
    apply_compression(lm, [TechniqueSpec.parse("eora:rank=4,tokens=128")])
    assert not any(isinstance(s.module, LowRankCompensated) for s in linear_sites(lm.model, head=True))
    lm = loaded("smollm")
    apply_compression(lm, [TechniqueSpec.parse("int4:group=32,head=true"),
                           TechniqueSpec.parse("eora:rank=4,tokens=128,head=true")])
    assert isinstance(lm.model.lm_head, LowRankCompensated)
    assert lm.model.embed.head is lm.model.lm_head  # the tied embedding reads the compensated head
    assert torch.isfinite(lm.model(torch.tensor([5, 6, 7]), torch.arange(3)).logits).all()


def test_eora_refuses_a_rank_larger_than_a_layer():
    with pytest.raises(SpecError, match=r"rank=65 exceeds layers\.0\.qkv's shape \[128, 64\].*at most 64"):
        apply_compression(loaded(), [TechniqueSpec.parse("int4:group=32"), TechniqueSpec.parse("eora:rank=65")])


@pytest.mark.parametrize("decode", ["draft_model:layers=2", "prompt_lookup"])
def test_an_eora_model_decodes_the_same_with_a_drafter(decode):
    lm = loaded()
    apply_compression(lm, [TechniqueSpec.parse("int4:group=32"), TechniqueSpec.parse("eora:rank=8,tokens=256")])
    plain = [[t for e in Engine(lm.model, RunSpec(max_new_tokens=24)).run(p) for t in e.tokens] for p in PROMPTS]
    spec = RunSpec(max_new_tokens=24, decode=TechniqueSpec.parse(decode))
    assert [[t for e in Engine(lm.model, spec).run(p) for t in e.tokens] for p in PROMPTS] == plain
