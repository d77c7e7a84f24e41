"""DFloat11: the Huffman code is valid and length-limited, decoding is bit-exact (whole weights and single
rows), the model's logits and greedy tokens are exactly the bf16 model's, and the size is about 70%."""

import pytest
import torch

from workbench.compression.base import apply_compression
from workbench.compression.dfloat11 import MAX_CODE_BITS, DFloat11Linear, canonical_codes, huffman_lengths
from workbench.engine import Engine
from workbench.models import LoadedModel
from workbench.models.packed_linear import pack_linears
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import PROMPTS, varied_model

pytestmark = pytest.mark.usefixtures("one_thread")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def test_huffman_code_is_prefix_free_and_limited():
    counts = torch.zeros(256, dtype=torch.long)
    counts[100:140] = (2.0 ** -torch.arange(40.0) * 1e12).long() + 1  # very skewed: unlimited codes reach 40 bits
    lengths = huffman_lengths(counts)
    assert max(lengths) == MAX_CODE_BITS and sum(2.0 ** -n for n in lengths if n) <= 1
    codes = canonical_codes(lengths)
    words = [format(codes[s], f"0{lengths[s]}b") for s in range(256) if lengths[s]]
    assert not any(a != b and b.startswith(a) for a in words for b in words)
    assert lengths[100] <= 2 and all(n == 0 for n in lengths[:100])


@pytest.mark.parametrize("shape", [(960, 576), (64, 1536), (3, 7)])
def test_decoding_is_bit_exact(shape):
    w = (torch.randn(shape) * 0.02).bfloat16()
    w[0, 0], w[-1, -1] = float("inf"), -0.0  # special values survive too
    m = DFloat11Linear(w, None)
    assert torch.equal(bits(m.dequantized_weight()), bits(w))
    ids = torch.tensor([shape[0] - 1, 0, shape[0] // 2])
    assert torch.equal(bits(m.rows(ids)), bits(w[ids]))


@pytest.mark.parametrize("shape", [(960, 576), (3, 7)])
def test_the_c_decoder_gives_the_torch_decoders_bits(shape, monkeypatch):
    from workbench.compression import dfloat11
    from workbench.kernels import cpu_dfloat11

    assert cpu_dfloat11.available(), cpu_dfloat11.unavailable_reason()  # a C compiler is part of the set-up
    w = (torch.randn(shape) * 0.02).bfloat16()
    w[0, 0], w[-1, -1] = float("-inf"), 0.0
    m = DFloat11Linear(w, None)
    ids = torch.tensor([shape[0] - 1, 0])
    assert not m.simulated
    ours, our_rows = m.dequantized_weight(), m.rows(ids)
    monkeypatch.setattr(dfloat11.cpu_dfloat11, "available", lambda: False)  # the torch decoder
    assert m.simulated
    assert torch.equal(bits(ours), bits(m.dequantized_weight())) and torch.equal(bits(ours), bits(w))
    assert torch.equal(bits(our_rows), bits(m.rows(ids))) and torch.equal(bits(our_rows), bits(w[ids]))


def test_size_is_about_70_percent_of_bf16():
    w = (torch.randn(1536, 576) * 0.02).bfloat16()
    assert DFloat11Linear(w, None).weight_nbytes() <= 0.72 * w.numel() * 2


def encoded(variant: str):
    model = varied_model(variant).to(torch.bfloat16)
    reference = varied_model(variant).to(torch.bfloat16)
    pack_linears(reference)  # as a Workbench runs a bf16 model on CPU: the products DFloat11's layers mirror
    loaded = LoadedModel(model, None, model.config, "tiny", "tiny", torch.bfloat16, torch.device("cpu"))
    apply_compression(loaded, [TechniqueSpec("dfloat11")])
    return model, reference


@pytest.mark.parametrize("variant", ["llama", "smollm", "qwen2"])
def test_model_outputs_are_bit_for_bit_the_bf16_models(variant):
    model, reference = encoded(variant)
    tokens = torch.tensor(PROMPTS[1])
    positions = torch.arange(len(tokens))
    assert torch.equal(model(tokens, positions).logits, reference(tokens, positions).logits)
    for decode in ["plain", "prompt_lookup", "draft_model:layers=2"]:
        spec = RunSpec(max_new_tokens=12, decode=TechniqueSpec.parse(decode))
        ours = [[t for e in Engine(model, spec).run(p) for t in e.tokens] for p in PROMPTS]
        assert ours == [[t for e in Engine(reference, spec).run(p) for t in e.tokens] for p in PROMPTS]


@pytest.mark.integration
def test_embedded_model_is_exact_at_most_72_percent():
    from workbench import Workbench

    wb = Workbench(dtype="bfloat16", device="cpu")
    plain = wb.generate("The capital of France is", "max_new_tokens=4;chat=false")
    ours = wb.generate("The capital of France is", "compress=dfloat11;max_new_tokens=4;chat=false")
    assert ours.text == plain.text
    reference = wb.model(wb.spec("")).model
    tokens = torch.tensor(ours.prompt_ids)
    positions = torch.arange(len(tokens))
    assert torch.equal(wb.model(wb.spec("compress=dfloat11")).model(tokens, positions).logits,
                       reference(tokens, positions).logits)
    from workbench.models import load_model

    assert ours.weight_bytes <= 0.72 * load_model("smollm2-135m", "bfloat16", "cpu").weight_bytes()  # unpacked bf16
