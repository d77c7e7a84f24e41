"""The roofline benchmark's parts: the bandwidth method on a small buffer, the bytes a decoding step reads
against the model's own tensors, and `workbench bench --roofline` end to end on a tiny random model."""

import importlib.util
import json

import pytest
import torch

from workbench.cache.base import KVCache
from workbench.cache.dense import DensePolicy
from workbench.cli import main
from workbench.compression.base import apply_compression
from workbench.compression.int4 import Int4Linear
from workbench.compression.int8 import Int8Linear
from workbench.errors import WorkbenchError
from workbench.eval.bandwidth import (
    METHODS,
    ReadBuffer,
    last_level_cache_bytes,
    main_memory_buffer_bytes,
    read_bandwidth,
)
from workbench.eval.roofline import kv_read_bytes, mean_decode_context, weight_read_bytes
from workbench.kernels import cpu
from workbench.models import LoadedModel
from workbench.models.packed_linear import PackedLinear, can_pack, pack_linears
from workbench.models.random import random_model
from workbench.spec import TechniqueSpec
from workbench.views.roofline import load_roofline, roofline_figure


def test_bandwidth_of_a_small_buffer_has_a_median_within_its_spread():
    result = read_bandwidth(1 << 20, repeats=3)
    low, high = result.spread
    assert result.buffer_bytes == 1 << 20 and len(result.samples) == 3
    assert 0 < low <= result.median <= high
    result.add(read_bandwidth(1 << 20, repeats=2))
    assert len(result.samples) == 5 and result.as_dict()["median_gb_s"] == result.median


@pytest.mark.skipif(not cpu.available(), reason="the C kernels do not run here")
@pytest.mark.parametrize("threads", [1, 2])
def test_the_read_kernel_reads_every_value(threads):
    values = torch.arange(1000, dtype=torch.float32)  # not a multiple of its 128-value chunks: the tail counts too
    assert cpu.read_f32(values, threads) == 999 * 1000 / 2
    assert cpu.read_f32(values[:100], threads) == 99 * 100 / 2  # under one chunk: all tail


@pytest.mark.parametrize("method", METHODS)
def test_each_bandwidth_method_measures_a_small_buffer(method):
    if method == "kernel" and not cpu.available():
        with pytest.raises(WorkbenchError, match="use torch.sum"):
            read_bandwidth(1 << 20, 1, method)
        return
    result = read_bandwidth(1 << 20, repeats=2, method=method)
    assert result.method == method and len(result.samples) == 2 and min(result.samples) > 0


def test_bandwidth_rejects_a_tiny_buffer_and_no_repeats():
    with pytest.raises(WorkbenchError, match="at least 4096 bytes"):
        ReadBuffer(100)
    with pytest.raises(WorkbenchError, match="at least 1"):
        ReadBuffer(1 << 16).measure(0)
    with pytest.raises(WorkbenchError, match="valid: kernel, torch.sum"):
        ReadBuffer(1 << 16).measure(1, "stream")


def test_main_memory_buffer_is_larger_than_the_last_level_cache():
    assert main_memory_buffer_bytes() == 2 * last_level_cache_bytes() > 0


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("variant", ["llama", "smollm"])
def test_weight_bytes_are_the_model_tensors_with_a_tied_head_counted_once(variant):
    model = random_model(variant)
    parts = weight_read_bytes(model)
    params = dict(model.named_parameters())  # a tied head's weight is listed once (as the embedding)
    embedding = params["embed.weight"]
    untied = 0 if model.config.tie_word_embeddings else _bytes([embedding])
    assert parts["layers"] + parts["lm_head"] + parts["norms"] == _bytes(params.values()) - untied
    assert parts["lm_head"] == _bytes([model.lm_head.weight])
    assert parts["embedding_row"] == embedding.shape[1] * 4


@pytest.mark.skipif(not can_pack(torch.bfloat16, torch.device("cpu")), reason="no AVX512-BF16 here")
def test_packed_int8_and_int4_bytes_are_what_their_kernels_read():
    sizes = {}
    for chain in ("", "int8", "int4:group=32,head=true"):
        model = random_model("smollm", dtype=torch.bfloat16, hidden_size=128, intermediate_size=256)
        loaded = LoadedModel(model, None, model.config, "tiny", "tiny", torch.bfloat16, torch.device("cpu"))
        if chain:
            apply_compression(loaded, [TechniqueSpec.parse(chain)])
        pack_linears(model)
        linears = [m for m in model.modules() if isinstance(m, (PackedLinear, Int8Linear, Int4Linear))]
        if chain == "int8":  # one byte a code and a float32 scale per output row
            expected = sum(m.out_features * (m.in_features + 4) for m in linears)
        elif chain:  # the packed nibbles and the (scale, offset) pairs, as stored
            expected = sum(_bytes([m.packed, m.scale_zeros]) for m in linears)
        else:
            expected = sum(m.out_features * m.in_features * 2 for m in linears)
        parts = weight_read_bytes(model)
        assert parts["layers"] + parts["lm_head"] == expected, chain
        sizes[chain] = expected
    assert sizes["int4:group=32,head=true"] < sizes["int8"] < sizes[""]


def test_kv_bytes_are_the_keys_and_values_attention_reads():
    model = random_model("llama")
    config = model.config
    cache = KVCache([DensePolicy().make_layer_cache(i, config, torch.float32, torch.device("cpu"), 32)
                     for i in range(config.num_layers)])
    model(torch.arange(3, 13), torch.arange(10), cache)
    held = sum(_bytes(layer.view()) for layer in cache.layers)
    assert kv_read_bytes(config, 4, 10) == held


def test_mean_decode_context_averages_the_steps_after_the_first_token():
    assert mean_decode_context([10], 3) == 11.5  # the steps feeding tokens 1 and 2 see 11 and 12 keys
    assert mean_decode_context([10, 20], 2) == 16.0


def test_bench_roofline_reports_each_format_against_the_bandwidth(tmp_path):
    out, plot = tmp_path / "roofline.json", tmp_path / "roofline.png"
    code = main(["bench", "--roofline", "--model", "random:smollm", "--format", "bf16", "--format", "int8",
                 "--prompts", "1", "--repeats", "1", "--max-new-tokens", "4", "--bandwidth-bytes", "4000000",
                 "--no-store", "--json", str(out), "--plot", str(plot)])
    result = json.loads(out.read_text())
    rows = {r["engine"]: r for r in result["rows"]}
    peak = result["bandwidth"]["main_memory"]["median_gb_s"]
    assert code == 0 and set(rows) == {"bf16", "int8"} and plot.stat().st_size > 0
    assert len(result["bandwidth"]["main_memory"]["samples"]) == 2  # one before the warm-up, one per round
    # the ceiling is the kernels' read where they run, torch.sum over the same buffers the second figure
    second = result["bandwidth_torch_sum"]
    assert result["bandwidth"]["main_memory"]["method"] == ("kernel" if cpu.available() else "torch.sum")
    assert set(second) == (set(result["bandwidth"]) if cpu.available() else set())
    assert all(b["method"] == "torch.sum" and len(b["samples"]) == 2 for b in second.values())
    for r in rows.values():
        assert r["bytes_per_token"] == sum(r["read_bytes"].values())
        assert r["achieved_gb_s"] == pytest.approx(r["bytes_per_token"] * r["tok_per_s"] / 1e9)
        assert r["fraction_of_bandwidth"] == pytest.approx(r["achieved_gb_s"] / peak)
    assert rows["int8"]["bytes_per_token"] < rows["bf16"]["bytes_per_token"]

    # the views draw it: one point per engine under the bandwidth curve; the widget and the app's tab show it
    figure = roofline_figure(load_roofline(out))
    points = [t for t in figure.data if t.mode == "markers+text"]
    assert [(t.name, t.y[0]) for t in points] == [(r["engine"], r["tok_per_s"]) for r in result["rows"]]
    if importlib.util.find_spec("ipywidgets"):
        from workbench.widgets import RooflineView

        view = RooflineView(out)
        assert len(view.figure.data) == len(figure.data) and "int8" in view.table.value
    if importlib.util.find_spec("gradio"):
        from workbench.apps import bench_tab

        bench_tab.RESULTS = tmp_path
        shown, table, note = bench_tab.show_roofline("roofline.json")
        assert len(shown.data) == len(figure.data) and list(table["engine"]) == ["bf16", "int8"]
        assert "pick a result" in bench_tab.show_roofline("../secret.json")[2]  # only files of the folder


def test_a_file_that_is_not_a_roofline_result_is_a_clear_error(tmp_path):
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(WorkbenchError, match="is not a roofline result"):
        load_roofline(tmp_path / "other.json")
    with pytest.raises(WorkbenchError, match="cannot read a roofline result"):
        load_roofline(tmp_path / "missing.json")
    assert "workbench bench --roofline" in roofline_figure(None).layout.annotations[0].text


def test_bench_roofline_names_the_peers_it_takes(capsys):
    assert main(["bench", "--roofline", "--model", "random:smollm", "--peers", "kvpress", "--no-store"]) == 2
    assert "--roofline takes peers llama-cpp" in capsys.readouterr().err
    assert main(["bench", "--roofline", "--model", "random:smollm", "--decode", "prompt_lookup", "--no-store"]) == 2
    assert "it takes no --decode" in capsys.readouterr().err
