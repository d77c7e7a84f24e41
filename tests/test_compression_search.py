"""Low-bit int4 (bits 2 and 3), decoupleQ, the `layers` selector, per-layer plans and the HAWQ and EvoPress
searches, on tiny random models (seconds)."""

import itertools
import random

import pytest
import torch

from workbench.compression.base import apply_compression, dense_weight, linear_sites, weight_nbytes
from workbench.compression.decoupleq import decoupleq_quantize, expand, layer_loss
from workbench.compression.evopress import level_switch
from workbench.compression.gptq import gptq_quantize
from workbench.compression.hawq import allocate
from workbench.compression.int4 import Int4Linear, LowBitLinear, quantize_rtn_int4
from workbench.compression.plan import LEVELS, LevelTable, average_bits, expand_plan_files, plan_string
from workbench.compression.search import search
from workbench.errors import SpecError
from workbench.models import LoadedModel
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")


def loaded_tiny() -> LoadedModel:
    model = varied_model("llama").float()
    return LoadedModel(model, None, model.config, "tiny", "tiny", torch.float32, torch.device("cpu"))


def compress(loaded: LoadedModel, text: str) -> None:
    apply_compression(loaded, [TechniqueSpec.parse(t) for t in text.split("+")])


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_int4_packs_codes_densely(bits):
    loaded = loaded_tiny()
    before = {s.name: dense_weight(s.module).clone() for s in linear_sites(loaded.model, head=False)}
    compress(loaded, f"int4:bits={bits},group=32")
    for site in linear_sites(loaded.model, head=False):
        m = site.module
        assert isinstance(m, LowBitLinear)
        groups = m.out_features * m.in_features // 32
        assert weight_nbytes(m) == m.out_features * -(-m.in_features * bits // 8) + 2 * groups * 4
        codes, scales, offsets = quantize_rtn_int4(before[site.name], 32, torch.float32, bits)
        assert int(codes.max()) <= 2 ** bits - 1
        torch.testing.assert_close(m.dequantized_weight(), expand(scales, 32) * codes + expand(offsets, 32))


def test_layers_selector_gives_layers_different_transforms():
    loaded = loaded_tiny()
    compress(loaded, "int4:bits=2,layers=0/1.down+int4:bits=4,layers=1.qkv/1.o/1.gate_up/2-3")
    kinds = {s.name: type(s.module) for s in linear_sites(loaded.model, head=False)}
    assert kinds["layers.0.qkv"] is LowBitLinear and kinds["layers.1.down"] is LowBitLinear
    assert kinds["layers.1.qkv"] is Int4Linear and kinds["layers.3.down"] is Int4Linear


@pytest.mark.parametrize("text, message", [
    ("int4:layers=0-1+int4:bits=2,layers=1", "both quantizers of the same layers"),
    ("int4:layers=0-9", "outside this model's decoder layers"),
    ("int4:layers=a.b", "not a layer index or range"),
])
def test_bad_plans_are_refused(text, message):
    with pytest.raises(SpecError, match=message):
        compress(loaded_tiny(), text)


def test_decoupleq_beats_rtn_and_gptq_on_the_layer_objective():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.3 + torch.randn(128, generator=g)
    h, w = x.T @ x / len(x), torch.randn(64, 128, generator=g) * 0.05

    def loss(codes, scales, offsets):
        return layer_loss(w, expand(scales, 32) * codes.float() + expand(offsets, 32), h)

    rtn, gptq = loss(*quantize_rtn_int4(w, 32, bits=2)), loss(*gptq_quantize(w, h, 2, 32, act_order=True))
    codes, scales, offsets = decoupleq_quantize(w, h, 2, 32)
    assert int(codes.max()) <= 3
    assert loss(codes, scales, offsets) < 0.95 * gptq < rtn


def test_allocate_is_the_exact_optimum():
    rng = random.Random(0)
    sizes = {f"s{i}": rng.choice([2, 3, 5]) for i in range(6)}
    sens = {n: {k: rng.random() * 2 ** -k for k in (0, 1, 2)} for n in sizes}
    plan = allocate(sens, sizes, 1.0)
    best = min((dict(zip(sizes, ks)) for ks in itertools.product((0, 1, 2), repeat=6)
                if sum(sizes[n] * k for n, k in zip(sizes, ks)) <= sum(sizes.values())),
               key=lambda p: sum(sens[n][p[n]] for n in p))
    assert sum(sizes[n] * plan[n] for n in plan) <= sum(sizes.values())
    assert sum(sens[n][plan[n]] for n in plan) == pytest.approx(sum(sens[n][best[n]] for n in best))


def test_level_switch_keeps_the_budget():
    sizes = {"a": 4, "b": 4, "c": 9, "d": 9}
    shapes = {"a": (2, 2), "b": (2, 2), "c": (3, 3), "d": (3, 3)}
    rng, levels = random.Random(1), {n: 3 for n in sizes}
    for _ in range(20):
        child = level_switch(levels, shapes, rng)
        assert sum(child[n] != levels[n] for n in sizes) == 2
        assert average_bits(child, sizes) == average_bits(levels, sizes)
        levels = child


def test_a_plan_runs_from_its_string_and_from_a_file(tmp_path):
    loaded = loaded_tiny()
    table = LevelTable.build(loaded.model)
    rng = random.Random(2)
    levels = {s.name: rng.randrange(len(LEVELS)) for s in table.sites}
    text = plan_string(levels, table.attrs)
    (tmp_path / "plan.txt").write_text(text + "\n")
    [chain] = expand_plan_files([f"plan:{tmp_path / 'plan.txt'}"])
    assert RunSpec.parse(text).compress == [TechniqueSpec.parse(t) for t in chain.split("+")]
    compress(loaded, chain)
    for site in linear_sites(loaded.model, head=False):
        torch.testing.assert_close(site.module.dequantized_weight(), table.weights[site.name][levels[site.name]])
    with pytest.raises(SpecError, match="does not exist"):
        expand_plan_files([f"plan:{tmp_path / 'missing.txt'}"])


def test_gptq_levels_are_uniform_gptq_so_a_search_can_keep_it():
    """Each GPTQ level is one sequential GPTQ pass of the whole model (EvoPress's database), so the all-one-level
    plan holds exactly what uniform `gptq` at that level holds. (Quantizing every layer on the uncompressed
    model's inputs instead, as the table did before, put the later layers 20-40% of their range away.)"""
    from workbench.compression.base import CompressionContext
    from workbench.compression.plan import Level

    loaded = loaded_tiny()
    ids = CompressionContext(None, torch.float32, torch.device("cpu"), loaded.config.vocab_size).calibration_ids(256)
    table = LevelTable.build(loaded.model, "gptq", ids)
    level = LEVELS.index(Level(3, 32))
    compress(loaded, "gptq:bits=3,group=32,tokens=256")
    sites = linear_sites(loaded.model, head=False)
    for site in sites:
        assert torch.equal(table.weights[site.name][level], site.module.dequantized_weight()), site.name
    assert not torch.equal(table.weights[sites[-1].name][level], table.weights[sites[-1].name][level - 1])


@pytest.mark.parametrize("method,quantizer", [("hawq", "rtn"), ("evopress", "rtn"), ("hawq", "gptq")])
def test_search_writes_a_plan_on_budget(method, quantizer):
    # uniform 2.5 bits at group 32 stores 2.5 + 32 / 32 = 3.5 bits per weight, scales and offsets included
    result = search("random:llama", method, 2.5, 0.05, group=32, tokens=256, samples=1, offspring=2,
                    survivors=(1,), generations=2, progress=False, quantizer=quantizer)
    assert result.average_bits <= 3.5 and set(result.levels.values()) <= set(range(len(LEVELS)))
    assert {t.name for t in RunSpec.parse(result.plan).compress} == {"rtn": {"int4"}, "gptq": {"gptq"}}[quantizer]


def test_a_plans_budget_is_its_real_bytes():
    """average_bits counts codes, scales and offsets: it equals the bits the plan's bf16 layers really hold."""
    loaded = loaded_tiny()
    loaded.model.to(torch.bfloat16)
    loaded.dtype = torch.bfloat16
    table = LevelTable.build(loaded.model)
    rng = random.Random(3)
    levels = {s.name: rng.randrange(len(LEVELS)) for s in table.sites}
    compress(loaded, "+".join(t.to_string() for t in RunSpec.parse(plan_string(levels, table.attrs)).compress))
    held = sum(weight_nbytes(s.module) for s in linear_sites(loaded.model, head=False))
    assert 8 * held / sum(table.sizes.values()) == pytest.approx(average_bits(levels, table.sizes))
    assert [lv.cost for lv in LEVELS] == [2.5, 3.0, 3.5, 4.0, 4.5, 5.0]


def test_search_refuses_a_budget_outside_the_levels():
    with pytest.raises(SpecError, match="outside the levels' range"):
        search("random:llama", "hawq", 5.0, 0.05)


def test_pareto_view_marks_the_front():
    from workbench.views.pareto import pareto_figure, pareto_front

    points = [{"label": "a", "search": None, "linear_share_of_bf16": 0.5, "perplexity": 14.0},
              {"label": "b", "search": None, "linear_share_of_bf16": 0.3, "perplexity": 20.0},
              {"label": "c", "search": None, "linear_share_of_bf16": 0.4, "perplexity": 25.0},
              {"label": "d", "search": "hawq", "linear_share_of_bf16": 0.2, "perplexity": 30.0}]
    assert [p["label"] for p in pareto_front(points)] == ["d", "b", "a"]
    fig = pareto_figure(points)
    assert [t.name for t in fig.data] == ["transforms", "searched plans", "Pareto front"]
    assert list(fig.data[1].text) == ["d"]


@pytest.mark.integration
def test_decoupleq_two_bit_beats_rtn_and_gptq_on_the_embedded_model():
    """On the first four decoder layers of SmolLM2-135M (the rest bf16), at the same packed 2-bit size."""
    import torch.nn.functional as F

    from workbench.models import load_model
    from workbench.text import evaluation_text

    def perplexity(chain: str) -> tuple[float, int]:
        loaded = load_model("smollm2-135m", "bfloat16", "cpu")
        compress(loaded, chain)
        ids = torch.tensor(loaded.tokenizer(evaluation_text()[:6000])["input_ids"][:512])
        with torch.no_grad():
            logits = loaded.model(ids, torch.arange(len(ids))).logits.float()
        nbytes = sum(weight_nbytes(s.module) for s in linear_sites(loaded.model, head=False)[:16])
        return float(F.cross_entropy(logits[:-1], ids[1:]).exp()), nbytes

    rtn, rtn_bytes = perplexity("int4:bits=2,layers=0-3")
    gptq, gptq_bytes = perplexity("gptq:bits=2,layers=0-3,tokens=512")
    ours, ours_bytes = perplexity("decoupleq:layers=0-3,tokens=512,iters=2,steps=10")
    assert ours_bytes == rtn_bytes == gptq_bytes
    assert ours < gptq < rtn


def test_pareto_widget_draws_the_points():
    from workbench.widgets import ParetoView

    points = [{"label": "int4", "search": None, "linear_share_of_bf16": 0.28, "perplexity": 15.0},
              {"label": "hawq plan", "search": "hawq", "linear_share_of_bf16": 0.22, "perplexity": 18.0}]
    view = ParetoView(points)
    assert len(view.figure.data) == 3 and "hawq plan" in view.table.value


def test_app_benchmarks_tab_draws_the_pareto_file(tmp_path):
    import json

    from workbench.apps import bench_tab

    points = [{"label": "int4:bits=2", "search": None, "linear_share_of_bf16": 0.16, "perplexity": 900.0}]
    (tmp_path / "pareto.json").write_text(json.dumps({"points": points}))
    original, bench_tab.RESULTS = bench_tab.RESULTS, tmp_path
    try:
        assert list(bench_tab.show_pareto().data[0].text) == ["int4:bits=2"]
        bench_tab.RESULTS = tmp_path / "none"
        assert len(bench_tab.show_pareto().data[0].x) == 0
    finally:
        bench_tab.RESULTS = original


def test_evopress_budget_holds_within_a_generation():
    import time

    from workbench.compression.evopress import evopress_plan

    model = loaded_tiny().model
    table = LevelTable.build(model)
    g = torch.Generator().manual_seed(0)
    segments = [torch.randint(0, model.config.vocab_size, (32,), generator=g) for _ in range(2)]
    start = {name: 3 for name in table.sizes}
    begin = time.monotonic()
    # 3000 offspring: one generation scores them all (many seconds); the deadline falls inside it
    levels, details = evopress_plan(model, table, segments, start, 3000, (4, 2), 10, 0, begin + 0.3, progress=False)
    assert time.monotonic() - begin < 2.0
    assert details["generations"] == 0 and levels == start
    assert all(torch.equal(s.module.weight, dense_weight(s.module)) for s in table.sites)
