"""Every script in scripts/ is listed in scripts/README.md and runs: each is imported and its `main()` run on a
tiny model (a random one with small shapes, or the embedded model on a few prompts for those that read text),
so a change elsewhere that breaks a script fails here. Figures are not checked: only that each script runs
and prints what it measures."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.kernels import cpu as cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
# SmolLM2-135M's proportions, shrunk: head_dim 32, grouped kv heads, a vocabulary the kernels take.
TINY_SHAPES = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason="measures the workbench's CPU kernels, which do not run on this CPU")


@pytest.fixture
def script(monkeypatch, capsys):
    """Import scripts/<name>.py (its sibling imports resolved), apply `patches` {module attribute: value} to it or
    to `decode_step_breakdown`, run its main() with `args`, and return what it printed."""
    monkeypatch.syspath_prepend(str(SCRIPTS))

    def run(name: str, *args: str, patches: dict | None = None) -> str:
        module = importlib.import_module(name)
        for target, value in (patches or {}).items():
            owner, attr = target.split(".") if "." in target else (name, target)
            monkeypatch.setattr(importlib.import_module(owner), attr, value)
        monkeypatch.setattr(sys, "argv", [name, *args])
        capsys.readouterr()
        module.main()
        return capsys.readouterr().out

    return run


def listed_scripts() -> set[str]:
    return set(re.findall(r"`([\w.]+\.(?:py|sh))`", (SCRIPTS / "README.md").read_text()))


def test_every_script_is_listed_in_the_readme_and_every_listed_script_exists():
    present = {p.name for p in SCRIPTS.iterdir() if p.suffix in (".py", ".sh")}
    assert present == listed_scripts()


def test_every_script_the_docs_name_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {m for path in docs for m in re.findall(r"scripts/([\w.]+\.(?:py|sh))", path.read_text())}
    assert named and named <= {p.name for p in SCRIPTS.iterdir()}


def test_every_script_is_smoke_tested_here():
    tested = set(re.findall(r'"(\w+)"', Path(__file__).read_text())) | {"gpu_check"}
    untested = {Path(name).stem for name in listed_scripts()} - tested - {"app_render_bench", "app_screenshots"}
    assert not untested, f"add a smoke test for {sorted(untested)}"


# ---- random weights, tiny shapes -------------------------------------------------------------------------

def test_the_store_benchmark_runs(monkeypatch, capsys, tmp_path):
    """`python -m workbench.store.bench` (docs/store.md's figures), on a few runs."""
    from workbench.store import bench

    monkeypatch.setattr("sys.argv", ["bench", "--runs", "3", "--max-new-tokens", "6", "--store", str(tmp_path / "s")])
    bench.main()
    out = capsys.readouterr().out
    assert '"runs": 3' in out and "record_run_first_tenth" in out


def test_long_context_drafters(script):
    out = script("long_context_drafters", "--model", "random:llama", "--lengths", "300", "--tasks", "passkey",
                 "--new-tokens", "4", "--drafters", "triforce:budget=64,chunk=8,window=16 prompt_lookup")
    assert "triforce" in out and "speed-up" in out


def test_sweep_local_vs_ray(script, tmp_path):
    pytest.importorskip("ray", reason="Ray is the sweep extra (make setup installs it)")
    (tmp_path / "p.txt").write_text("5 6 7 8\n9 10 11\n")
    out = script("sweep_local_vs_ray", "--model", "random:llama", "--spec", "", "--spec", "temperature=0.7",
                 "--prompts", str(tmp_path / "p.txt"), "--seeds", "0", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "r.json"))
    assert "local:" in out and "ray:" in out and "identical tokens: 2/2 greedy cells, 2/2 sampled" in out


def test_thread_wait_ab(script, tmp_path):
    out = script("thread_wait_ab", "--model", "random:llama", "--prompt", "5 6 7", "--max-new-tokens", "4",
                 "--repeat", "1", "--out", str(tmp_path / "r.json"))
    assert "passive (sleep)" in out and "active (spin)" in out and (tmp_path / "r.json").exists()


def test_long_context_cache(script, tmp_path):
    out = script("long_context_cache", "--model", "random:llama", "--per-cell", "1", "--lengths", "300",
                 "--context", "200", "--scored", "8", "--tasks", "kv", "--out", str(tmp_path / "r.json"))
    assert "shadowkv" in out and "file_share" in out
    assert {r["task"] for r in json.loads((tmp_path / "r.json").read_text())["rows"]} == {"kv"}
    assert not (tmp_path / "r.json.partial").exists()  # a finished run leaves only its results


def test_cachegen_sensitivity(script, tmp_path):
    out = script("cachegen_sensitivity", "--model", "random:llama", "--context", "64", "--scored", "4",
                 "--windows", "2", "--variants", "3/3/1/1/4", "4/3/0/0/0", "--out", str(tmp_path / "r.json"))
    assert "file_share" in out and "layer  0 alone" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["scored_tokens"] == 2 * 3 and [v["variant"] for v in result["variants"]] == ["3/3/1/1/4", "4/3/0/0/0"]


def test_compression_pareto(script, tmp_path):
    out = script("compression_pareto", "--model", "random:llama", "--tokens", "64", "--window", "32", "--minutes",
                 "0.01", "--quantizer", "gptq", "--methods", "hawq", "hawq-hessian", "evopress",
                 "--chains", "gptq:bits=3", "int8", "--out", str(tmp_path), "--figure", str(tmp_path / "p.png"))
    assert "hawq plan" in out and "evopress plan" in out and (tmp_path / "pareto.json").exists()
    search = json.loads((tmp_path / "compression_search.json").read_text())
    assert search["quantizer"] == "gptq" and search["uniform"]["chain"] == "gptq:bits=3"
    assert set(search["plans"]) == {"hawq", "hawq-hessian", "evopress"}


def test_two_bit_perplexity(script, tmp_path):
    out = script("two_bit_perplexity", "--model", "random:llama", "--tokens", "64", "--window", "32", "--baselines",
                 "int4:bits=2", "--start", "int4:bits=3,group=32", "--pvtune", "steps=1,tokens=64,segment=32",
                 "--json", str(tmp_path / "t.json"))
    assert "int4:bits=3,group=32+pvtune" in out and (tmp_path / "t.json").exists()


def test_delta_compression(script, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    out = script("delta_compression", "--model", "random:llama", "--minutes", "0.05", "--max-steps", "2",
                 "--specs", "dare:p=0.5", "adapter1bit", "--out", str(tmp_path / "d.json"))
    assert "dare:p=0.5" in out and "of the gain" in out and (tmp_path / "d.json").exists()


def test_compression_bytes(script):
    from workbench.models import load_model

    out = script("compression_bytes", "int8", patches={"load_model": lambda **kw: load_model("random:llama", **kw)})
    assert "int8" in out and "of bf16" in out


def test_cache_bytes(script, tmp_path):
    from workbench.api import Workbench

    out = script("cache_bytes", "dense", "kivi:bits=2", "streaming:sinks=2,window=8", "--prompt-tokens", "40",
                 "--new-tokens", "4", "--json", str(tmp_path / "bytes.json"),
                 patches={"Workbench": lambda **kw: Workbench("random:llama", **kw)})
    assert "`kivi:bits=2`" in out and "allocated MB" in out and (tmp_path / "bytes.json").exists()


def test_compression_speed(script, tmp_path):
    from workbench.api import Workbench

    out = script("compression_speed", "int8", "--tokens", "4", "--prompts", "1", "--repeats", "1",
                 "--json", str(tmp_path / "speed.json"),
                 patches={"Workbench": lambda **kw: Workbench("random:llama", **kw),
                          "BASELINE_PROMPTS": ["5 6 7 8 9"]})
    assert "int8" in out and (tmp_path / "speed.json").exists()


def test_decode_step_breakdown(script):
    out = script("decode_step_breakdown", patches={"SHAPES": TINY_SHAPES})
    assert "ms" in out


def test_tree_verify_cost(script):
    out = script("tree_verify_cost", "--tokens", "1,3", "--lm-head",
                 patches={"decode_step_breakdown.SHAPES": TINY_SHAPES})
    assert "  1 tokens" in out and "  3 tokens" in out and "LM head, 4 rows" in out


@needs_kernels
def test_tree_verify_cost_on_each_product_unit(script, tmp_path):
    from workbench.kernels import cpu

    units = "amx,avx512-bf16" if cpu.use_amx(True) else "avx512-bf16"
    out = script("tree_verify_cost", "--tokens", "2", "--units", units, "--json", str(tmp_path / "t.json"),
                 patches={"decode_step_breakdown.SHAPES": TINY_SHAPES})
    row = json.loads((tmp_path / "t.json").read_text())["ms"][0]
    assert row["tokens"] == 2 and set(row) == {"tokens", *(f"{u}, fused SDPA" for u in units.split(","))}
    assert "avx512-bf16, fused SDPA" in out and cpu.product_unit() == ("amx" if "amx" in units else "avx512-bf16")


def test_self_speculation_bound(script):
    out = script("self_speculation_bound", patches={"SHAPES": TINY_SHAPES})
    assert "plain step t1" in out and "/6" in out


@needs_kernels
def test_kernel_ab(script):
    out = script("kernel_ab", "layer", "--cached", "20", "--drafted", "0", "3",
                 patches={"decode_step_breakdown.SHAPES": TINY_SHAPES})
    assert out.strip()


@needs_kernels
def test_cpu_attention_bench(script):
    assert script("cpu_attention_bench", "--keys", "40").strip()
    out = script("cpu_attention_bench", "--keys", "1100", "--layers", "2")  # beyond the default buffer
    assert "over 1100 keys" in out


@needs_kernels
def test_cpu_attention_bench_alternates_the_units(script, tmp_path):
    was = cpu_kernels.product_unit()
    has_tiles = cpu_kernels.use_amx(True)
    cpu_kernels.use_amx(was == "amx")
    if not has_tiles:
        pytest.skip("this CPU has no AMX-BF16 tiles, or Linux does not grant them")
    script("cpu_attention_bench", "--keys", "300", "--rows", "1,3", "--units", "amx,avx512-bf16",
           "--json", str(tmp_path / "a.json"))
    medians = json.loads((tmp_path / "a.json").read_text())["medians"]
    assert {(m["rows"], m["unit"]) for m in medians} == {(1, "amx"), (1, "avx512-bf16"), (3, "amx"), (3, "avx512-bf16")}
    assert all(m["us_per_layer"] > 0 for m in medians)


@needs_kernels
def test_cpu_kernels_bench(script, tmp_path):
    out = script("cpu_kernels_bench", "1", "4", "--layers", "1", "--json", str(tmp_path / "p.json"),
                 patches={"HEAD": (1024, 576)})
    assert "workbench int4" in out
    table = json.loads((tmp_path / "p.json").read_text())
    assert [r["rows"] for r in table["ms"]] == [1, 4] and table["ms"][0]["workbench bf16 avx512"] > 0
    assert "workbench int4 g32" in script("cpu_kernels_bench", "1", "--resident")  # the kernels' arithmetic ceiling


def test_decode_time_split(script):
    out = script("decode_time_split", "bf16", "int8:act=int8", "--tokens", "4", "--model", "random:smollm")
    assert "int8:act=int8" in out and len(out.splitlines()) == 3


@needs_kernels
def test_topk_bench(script):
    assert "torch.topk" in script("topk_bench", patches={"VOCAB": 2048})


def test_gpu_check_is_valid_bash():
    """It needs the lent GPU machine to run; here only its syntax is checked."""
    assert subprocess.run(["bash", "-n", str(SCRIPTS / "gpu_check.sh")]).returncode == 0


# ---- the embedded model, on a few prompts ----------------------------------------------------------------

def a_few_prompts(suite):
    return lambda *args, **kwargs: suite(*args, **kwargs)[:2]


@pytest.mark.integration
def test_compression_perplexity(script):
    out = script("compression_perplexity", "int8", "--tokens", "200", "--window", "100")
    assert "uncompressed" in out and "int8" in out


@pytest.mark.integration
def test_early_exit_agreement(script):
    assert "top-1 agreement" in script("early_exit_agreement")


@pytest.mark.integration
def test_engine_step_parts(script):
    from workbench.eval.suite import suite

    out = script("engine_step_parts", "plain", "prompt_lookup", "--per-category", "1",
                 patches={"suite": a_few_prompts(suite)})
    assert "prompt_lookup" in out
    out = script("engine_step_parts", "plain", "prompt_lookup", "--long-context", "300", "--task", "kv",
                 "--new-tokens", "4")
    assert "prompt_lookup" in out


@pytest.mark.integration
def test_prompt_lookup_replay(script):
    from workbench.eval.suite import suite

    out = script("prompt_lookup_replay", "--categories", "code_edit", patches={"suite": a_few_prompts(suite)})
    assert "code_edit" in out


@pytest.mark.integration
def test_token_recycling_steps(script):
    from workbench.eval.suite import suite

    out = script("token_recycling_steps", patches={"suite": a_few_prompts(suite)})
    assert "steps" in out


@pytest.mark.integration
def test_gpu_profile(script):
    out = script("gpu_profile", "--device", "cpu", "--tokens", "4", "--top", "3", "--rounds", "1")
    assert "transformers generate" in out and "workbench graphs=on" in out and "x transformers" in out


def test_dfloat11_decode_speed(script):
    out = script("dfloat11_decode_speed", "--shapes", "64x128", "--repeats", "1", "--tokens", "0")
    assert "64x128: C" in out and "bit-exact True" in out


def test_triton_bench():
    """The GPU benchmark's code on tiny shapes in Triton's interpreter (a subprocess: the mode is set before
    Triton is imported); its figures need a GPU (scripts/gpu_check.sh kernels)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    path = SCRIPTS / ("triton_bench" + ".py")
    run = subprocess.run([sys.executable, str(path), "--smoke"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0 and "smoke run: 16 rows" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


def test_widget_rate(script):
    pytest.importorskip("nbclient")
    out = script("widget_rate", "--model", "random:llama", "--max-new-tokens", "4", "--repeats", "1", "--out", "")
    assert "tokens displayed/s" in out and "updates/s" in out


def test_make_notebooks_check(script):
    """`make_notebooks.py --check`: the committed labs are what notebooks/src/ generates (main returns 0)."""
    import make_notebooks

    assert make_notebooks.rendered()  # every lab renders, student and solutions copies
    script("make_notebooks", "--check")


def test_notebook_screenshots_helpers_drive_the_browser_test():
    """`notebook_screenshots`' JupyterLab launcher and widget-cell runner are what tests/test_notebooks_browser.py
    runs in Chromium (the screenshots themselves need the browser, like app_screenshots)."""
    name = "notebook_screenshots"
    text = (ROOT / "tests" / "test_notebooks_browser.py").read_text()
    assert f'import_module("{name}")' in text
    assert "shots.jupyterlab(" in text and "shots.run_widget_cell(" in text
