"""Weight transforms: the contract every registered transform keeps (bytes, forward, stages), int8, int4 and
pruning specifics, refused combinations, tied embeddings, the Workbench integration, and the matrix of
every transform x drafters (greedy output equals the compressed model's own plain decoding)."""

import pytest
import torch
import torch.nn.functional as F

from workbench import Workbench, registry
from workbench.compression.base import (
    CompressedLinear,
    TiedEmbedding,
    apply_compression,
    dense_weight,
    linear_sites,
    weight_nbytes,
)
from workbench.compression.int4 import Int4Linear, quantize_rtn_int4
from workbench.compression.int8 import quantize_int8
from workbench.compression.prune import magnitude_mask
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.models import LoadedModel
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import PROMPTS, varied_model

pytestmark = pytest.mark.usefixtures("one_thread")

TRANSFORMS = [t.name for t in registry.techniques("compression")]
# Parameters that fit the tiny models and keep tests fast; chains for transforms that need an earlier one.
TEST_CHAINS = {"gptq": "gptq:tokens=256", "fp4": "fp4:tokens=256", "eora": "int4+eora:tokens=256,rank=4",
               "decoupleq": "decoupleq:tokens=256,iters=1,steps=5",
               # delta transforms, on an int8 base, over the random fine-tunes of `delta_finetunes`
               "finetune": "int8+finetune:tune=lora", "dare": "int8+dare", "compeft": "int8+compeft",
               "adapter1bit": "int8+adapter1bit",
               "prunenet": "prunenet:multiple=16,episodes=2+int4:group=32",  # int4: every linear replaced
               "pvtune": "int4:bits=2,group=32+pvtune:steps=1,tokens=64,segment=32"}
BF16_ONLY = {"dfloat11"}


@pytest.fixture(scope="module", autouse=True)
def delta_finetunes(tmp_path_factory):
    """Random deltas cached as the tiny models' fine-tunes (full and LoRA), for the delta transforms of the
    matrix; their training and quality are tested in test_delta_compression.py."""
    from workbench.training.checkpoints import save_checkpoint
    from workbench.training.finetune import finetune_path, finetune_settings

    folder = tmp_path_factory.mktemp("finetunes")
    g = torch.Generator().manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("workbench.training.checkpoints.cache_root", lambda: folder)
        for variant in ("llama", "smollm"):
            model = varied_model(variant)
            for mode in ("full", "lora", "lora1bit"):
                settings = finetune_settings(mode, 16, "auto", len(model.layers))
                deltas = {s.name: {"delta": torch.randn(s.module.weight.shape, generator=g) * 0.01} if mode == "full"
                          else {"a": torch.randn(16, s.module.in_features, generator=g) * 0.1, "scale": 1.0,
                                "b": torch.randn(s.module.out_features, 16, generator=g) * 0.1}
                          for s in linear_sites(model, head=False)}
                save_checkpoint(finetune_path(model, settings), {"settings": settings, "deltas": deltas})
        yield


def chain(name: str) -> list[TechniqueSpec]:
    return [TechniqueSpec.parse(t) for t in TEST_CHAINS.get(name, name).split("+")]


def compressed(text: str, variant: str = "llama", dtype: torch.dtype = torch.float32):
    model = varied_model(variant).to(dtype)
    loaded = LoadedModel(model, None, model.config, "tiny", "tiny", dtype, torch.device("cpu"))
    reports = apply_compression(loaded, [TechniqueSpec.parse(t) for t in text.split("+")])
    return loaded, reports


def generate(model, decode: str = "plain", n: int = 16) -> list[list[int]]:
    spec = RunSpec(max_new_tokens=n, decode=TechniqueSpec.parse(decode))
    return [[t for e in Engine(model, spec).run(p) for t in e.tokens] for p in PROMPTS]


def test_every_transform_is_in_the_matrix():
    assert {"int8", "int4", "prune", "dfloat11"} <= set(TRANSFORMS)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_contract(name):
    """Every linear is replaced (or rewritten) in place; forward applies dequantized_weight(); bytes are real."""
    dtype = torch.bfloat16 if name in BF16_ONLY else torch.float32
    model = varied_model("smollm").to(dtype)
    loaded = LoadedModel(model, None, model.config, "tiny", "tiny", dtype, torch.device("cpu"))
    before = loaded.weight_bytes()
    reports = apply_compression(loaded, chain(name))
    assert [r.stage for r in reports] == [registry.get("compression", s.name).cls.stage for s in chain(name)]
    assert reports[0].bytes_before == before and reports[-1].bytes_after == loaded.weight_bytes()
    assert reports[-1].layers >= 4 * model.config.num_layers
    for site in linear_sites(model, head=True):
        m = site.module
        if not isinstance(m, CompressedLinear):
            continue
        w = m.dequantized_weight()
        assert w.shape == (m.out_features, m.in_features) and w.dtype == dtype
        x = torch.randn(3, m.in_features, dtype=dtype)
        torch.testing.assert_close(m(x), F.linear(x, w, m.bias), atol=1e-2, rtol=1e-2)
        assert 0 < m.weight_nbytes() < m.out_features * m.in_features * w.element_size() * 1.1
    # weight_bytes counts compressed layers through their buffers: the same total as weight_nbytes per layer.
    others = sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
                 if not any(n.startswith(s.name + ".") for s in linear_sites(model, head=True)))
    sites = linear_sites(model, head=not isinstance(model.embed, torch.nn.Embedding))
    biases = sum(s.module.bias.numel() * s.module.bias.element_size() for s in sites if s.module.bias is not None)
    assert loaded.weight_bytes() == others + sum(weight_nbytes(s.module) for s in sites) + biases


def test_int8_rounds_each_row_to_its_own_grid():
    w = torch.randn(64, 96) * torch.logspace(-3, 0, 64)[:, None]
    codes, scales = quantize_int8(w, torch.float32)
    assert codes.abs().max() <= 127 and codes.dtype == torch.int8
    assert ((codes.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()


def test_int8_kernel_matches_the_reference_path():
    loaded, _ = compressed("int8", dtype=torch.bfloat16)
    m = loaded.model.layers[0].gate_up
    x = torch.randn(5, m.in_features, dtype=torch.bfloat16)
    torch.testing.assert_close(m(x).float(), F.linear(x.float(), m.dequantized_weight().float()), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("out_features", [128, 96])  # the kernel's tiled layout, and plain nibbles
def test_int4_codes_round_trip_and_rows(out_features):
    w = torch.randn(out_features, 128)
    codes, scales, offsets = quantize_rtn_int4(w, 32)
    assert codes.max() <= 15
    m = Int4Linear.from_affine(codes, scales, offsets, 32, None, torch.float32)
    assert torch.equal(m.codes(), codes)
    ids = torch.tensor([0, 5, out_features - 1, 5])
    assert torch.equal(m.rows(ids), m.dequantized_weight()[ids])
    assert (m.dequantized_weight() - w).abs().max() <= (scales.max() * 0.5 + 0.02)


def test_int4_in_bf16_holds_the_workbench_layout_and_matches_its_dequantized_weight():
    from workbench.kernels import cpu
    if not cpu.available():
        pytest.skip("no C compiler or no AVX512-BF16 on this CPU")
    w = torch.randn(96, 128)
    codes, scales, offsets = quantize_rtn_int4(w, 32, torch.bfloat16)
    m = Int4Linear.from_affine(codes, scales, offsets, 32, None, torch.bfloat16)
    assert m.own_kernel and m.packed.shape == (6, 16, 64) and torch.equal(m.codes(), codes)
    expected = (codes.float() * scales.float().repeat_interleave(32, 1) + offsets.float().repeat_interleave(32, 1))
    assert torch.equal(m.dequantized_weight(), expected.bfloat16())
    ids = torch.tensor([0, 5, 95, 5])
    assert torch.equal(m.rows(ids), m.dequantized_weight()[ids])
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(m(x).float(), x.float() @ expected.T, atol=0.05, rtol=2e-2)
    assert m.weight_nbytes() == 96 * 128 // 2 + 96 * 4 * 2 * 2  # codes, bf16 scales and offsets per group


@pytest.mark.parametrize("group", [32, 64])
def test_int4_bytes_at_most_35_percent_of_bf16(group):
    codes, scales, offsets = quantize_rtn_int4(torch.randn(576, 1536), group)
    m = Int4Linear.from_affine(codes, scales, offsets, group, None, torch.bfloat16)
    assert m.weight_nbytes() <= 0.35 * 576 * 1536 * 2


def test_int4_group_must_fit_the_shapes():
    with pytest.raises(SpecError, match=r"does not divide .* valid groups here: 16, 32, 64$"):
        compressed("int4:group=128")  # the tiny model's 64-input layers
    with pytest.raises(SpecError, match="not allowed"):
        TechniqueSpec.parse("int4:group=48").validated("compression")


def test_prune_masks():
    w = torch.randn(16, 64)
    assert (~magnitude_mask(w, 0.7, "unstructured")).sum() == round(0.7 * w.numel())
    per4 = magnitude_mask(w, 0.5, "2:4").view(16, -1, 4)
    assert (per4.sum(-1) == 2).all()
    kept = w.abs().view(16, -1, 4)
    assert (kept.masked_fill(~per4, float("inf")).amin(-1) >= kept.masked_fill(per4, 0).amax(-1)).all()


def test_prune_bytes_are_honest():
    loaded, reports = compressed("prune:sparsity=0.5")
    m = loaded.model.layers[0].gate_up
    assert m.simulated and m.weight_nbytes() == m.out_features * m.in_features * (1 / 8 + 0.5 * 4)
    assert (m.dequantized_weight() == 0).float().mean() == 0.5
    dense, reports = compressed("prune:storage=dense", "smollm")
    assert reports[0].bytes_after == reports[0].bytes_before and reports[0].layers == 4 * 4
    assert dense.model.lm_head.weight is dense.model.embed.weight  # head not pruned: still tied
    with pytest.raises(SpecError, match="2:4 fixes sparsity"):
        TechniqueSpec.parse("prune:pattern=2:4,sparsity=0.7").validated("compression")


@pytest.mark.parametrize("text, names", [("int8+int4", ("int8", "int4")), ("int4+dfloat11", ("int4", "dfloat11")),
                                         ("prune+int8", ("int8", "prune")), ("int8+prune", ("int8", "prune"))])
def test_combinations_that_cannot_work_are_refused(text, names):
    with pytest.raises(SpecError) as err:
        compressed(text, dtype=torch.bfloat16)
    assert all(n in str(err.value) for n in names)


def test_unknown_transform_and_dtype_refusals():
    with pytest.raises(SpecError, match="unknown compression technique 'int3'"):
        compressed("int3")
    with pytest.raises(SpecError, match="dfloat11 encodes bfloat16"):
        compressed("dfloat11")


def test_stage_order_not_spec_order():
    _, reports = compressed("eora:tokens=256,rank=4+int4")  # quantize runs first, whatever the order written
    assert [r.stage for r in reports] == ["quantize", "compensate"]
    assert reports[1].bytes_after > reports[1].bytes_before  # the low-rank factors add bytes


@pytest.mark.parametrize("text", ["int8", "int4:head=true", "prune:head=true"])
def test_tied_embedding_reads_the_compressed_head(text):
    loaded, _ = compressed(text, "smollm")
    model = loaded.model
    assert isinstance(model.embed, TiedEmbedding) and model.embed.head is model.lm_head
    ids = torch.tensor([3, 7, 3])
    assert torch.equal(model.embed(ids), dense_weight(model.lm_head)[ids])
    untied, _ = compressed(text.split(":")[0] + ":head=false", "smollm")
    assert loaded.weight_bytes() < untied.weight_bytes()


def test_workbench_applies_the_spec_and_reports_real_bytes():
    wb = Workbench("random:smollm", dtype="bfloat16", device="cpu")
    plain = wb.generate("5 6 7 8", "max_new_tokens=4")
    small = wb.generate("5 6 7 8", "compress=int4:group=32,head=true;max_new_tokens=4")
    assert small.weight_bytes < 0.5 * plain.weight_bytes
    assert wb.model(wb.spec("")).compression == []  # the cached uncompressed model is untouched
    assert [r.name for r in wb.model(wb.spec("compress=int4:group=32,head=true")).compression] == \
        ["int4:group=32,head=true"]


@pytest.mark.parametrize("text", ["int4", "int8:head=false", "int4:group=32/head=true", "prune:storage=dense"])
def test_compressed_self_draft_is_lossless(text):
    model = varied_model("llama")
    assert generate(model, f"draft_model:compress={text}") == generate(model)
    assert generate(model, f"draft_model:compress={text},layers=2") == generate(model)


@pytest.mark.parametrize("drafter", ["rsd", "dyspec"])
def test_drafters_built_on_draft_model_take_a_compressed_draft(drafter):
    model = varied_model("llama")
    assert generate(model, f"{drafter}:compress=int4:group=32") == generate(model)


def test_compressed_draft_spec_errors():
    with pytest.raises(SpecError, match="unknown compression technique"):
        RunSpec.parse("decode=draft_model:compress=int3").validated()
    with pytest.raises(SpecError, match="draft=self"):
        RunSpec.parse("decode=draft_model:draft=other,compress=int4").validated()
    spec = RunSpec.parse("decode=draft_model:compress=int4:group=32/head=true")
    assert RunSpec.parse(spec.to_string()).validated().decode == spec.validated().decode


DRAFTERS = ["prompt_lookup", "draft_model:layers=2", "rsd:layers=2"]


@pytest.mark.parametrize("name", [n for n in TRANSFORMS if n not in BF16_ONLY])
def test_every_transform_works_with_every_drafter(name):
    """float32 (as the lossless tests): greedy output of each drafter equals the compressed model's own."""
    model = varied_model("llama")
    apply_compression(LoadedModel(model, None, model.config, "tiny", "tiny", torch.float32, torch.device("cpu")),
                      chain(name))
    plain = generate(model)
    for decode in DRAFTERS:
        assert generate(model, decode) == plain, decode


POLICIES = [t.name for t in registry.techniques("cache") if t.name != "dense"]


@pytest.fixture(scope="module")
def compressed_models():
    """One tiny float32 model per registered transform (dfloat11: bf16), compressed once for the module."""
    out = {}
    for name in TRANSFORMS:
        dtype = torch.bfloat16 if name in BF16_ONLY else torch.float32
        model = varied_model("llama").to(dtype)
        apply_compression(LoadedModel(model, None, model.config, "tiny", "tiny", dtype, torch.device("cpu")),
                          chain(name))
        out[name] = model
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_every_transform_runs_with_every_cache_policy(compressed_models, policy):
    """Cache policies are lossy, so no equality here: every transform x policy x drafter runs to the end."""
    for name, model in compressed_models.items():
        for decode in ["plain", "draft_model:layers=2"]:
            spec = RunSpec(max_new_tokens=8, decode=TechniqueSpec.parse(decode), cache=[TechniqueSpec(policy)])
            tokens = [t for e in Engine(model, spec).run(PROMPTS[1]) for t in e.tokens]
            assert len(tokens) == 8, (name, decode)
