"""The command line on tiny random models: output shapes, streaming and one-line errors."""

import json
import re
import subprocess
import sys

import pytest

from workbench.cli import main

RANDOM = ["--model", "random:llama", "--dtype", "float32"]


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_json_describes_every_technique(capsys):
    code, out, _ = run_cli(capsys, "list", "--json")
    items = json.loads(out)
    assert code == 0
    assert {"category", "name", "params", "lossless"} <= set(items[0])
    plain = next(i for i in items if i["name"] == "plain")
    assert plain["category"] == "decoding" and plain["lossless"] is True
    assert all(isinstance(i["lossless"], bool) for i in items)  # every category declares it


def test_list_text_names_categories(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "decoding:" in out and "plain" in out and "compression:" in out


def test_generate_json_has_the_documented_fields(capsys):
    code, out, _ = run_cli(capsys, "generate", "5 6 7 8", *RANDOM, "--max-new-tokens", "9", "--json")
    result = json.loads(out)
    assert code == 0
    for key in ("text", "prompt_token_ids", "token_ids", "n_new_tokens", "tok_per_s", "ttft_s", "target_forwards",
                "mean_accepted_length", "cache_bytes", "spec", "weight_bytes"):
        assert key in result, key
    assert result["prompt_token_ids"] == [5, 6, 7, 8]
    assert result["n_new_tokens"] == len(result["token_ids"]) == 9
    assert result["target_forwards"] == 9 and result["mean_accepted_length"] == 1.0
    assert result["cache_bytes"] > 0 and result["weight_bytes"] > 0
    assert "max_new_tokens=9" in result["spec"] and "model=random:llama" in result["spec"]


def test_generate_is_reproducible_with_a_seed(capsys):
    args = ["generate", "5 6 7 8", *RANDOM, "--max-new-tokens", "12", "--temperature", "1", "--seed", "4", "--json"]
    first = json.loads(run_cli(capsys, *args)[1])["token_ids"]
    second = json.loads(run_cli(capsys, *args)[1])["token_ids"]
    assert first == second


def test_generate_streams_text(capsys):
    code, out, err = run_cli(capsys, "generate", "5 6 7 8", *RANDOM, "--max-new-tokens", "3")
    assert code == 0 and out.count("<") == 3  # the fallback detokenizer writes ids as <id>
    assert "3 tokens" in err


@pytest.mark.parametrize("args, message", [
    (["generate", "   ", *RANDOM], "the prompt is empty"),
    (["generate", " ".join(["3"] * 600), *RANDOM], "context window is 512"),
    (["generate", "hi", "--model", "/no/such/model.gguf"], "no/such/model.gguf"),
    (["generate", "hi", "--model", "no-such-model-xyz"], "no-such-model-xyz"),
    (["generate", "5", *RANDOM, "--decode", "telepathy"], "unknown decoding technique 'telepathy'; valid: "),
    (["generate", "5", *RANDOM, "--decode", "plain:k=3"], "has no parameter 'k'"),
    (["generate", "5", *RANDOM, "--cache", "nope"], "unknown cache technique 'nope'; valid: .*dense, .*h2o"),
    (["generate", "5", *RANDOM, "--compress", "int3"],
     "unknown compression technique 'int3'; valid: .*dfloat11, .*int4, .*int8"),
    (["generate", "5", *RANDOM, "--temperature", "-2"], "temperature must be >= 0"),
    (["generate", "5", "--model", "random:llama", "--device", "cuda"], "no CUDA GPU"),
    (["generate", "5", "--model", "random:gpt2"], "unknown random variant"),
])
def test_errors_are_one_line_with_exit_code_2(capsys, args, message):
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err  # the valid-name lists grow: checked as patterns


def test_installed_command_exits_nonzero_on_bad_input():
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "generate", "", *RANDOM],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "the prompt is empty" in proc.stderr and "Traceback" not in proc.stderr


def test_invalid_dtype_choice_is_refused_by_the_parser():
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "generate", "hi", "--dtype", "int3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'int3'" in proc.stderr


def test_docs_catalogue_is_up_to_date():
    """docs/techniques.md is generated from the registry (in a fresh process, free of test techniques)."""
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "list", "--markdown"], capture_output=True,
                          text=True, timeout=120, check=True)
    docs = Path(__file__).resolve().parents[1] / "docs" / "techniques.md"
    assert proc.stdout == docs.read_text(), "regenerate with: workbench list --markdown > docs/techniques.md"


@pytest.mark.integration
def test_bench_decode_over_the_suite_reports_speedups(tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", "--decode", "prompt_lookup", "--categories", "summarization", "--per-category", "1",
                 "--max-new-tokens", "12", "--json", str(out), "--plot", str(tmp_path / "speedup.png"),
                 "--store", str(tmp_path / "runs.duckdb")])
    result = json.loads(out.read_text())
    assert code == 0 and result["prompts"] == 1 and len(result["suite_hash"]) == 64
    rows = {(r["category"], r["engine"]): r for r in result["rows"]}
    assert rows[("summarization", "plain")]["speedup"] == 1.0
    assert rows[("summarization", "prompt_lookup")]["mean_accepted_length"] >= 1.0
    assert (tmp_path / "speedup.png").stat().st_size > 0
    assert main(["sql", "SELECT count(*) AS n FROM runs", "--json", "--store", str(tmp_path / "runs.duckdb")]) == 0


@pytest.mark.integration
def test_bench_compares_draft_model_with_transformers_assisted_generation(tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", "--decode", "draft_model:layers=6", "--peers",
                 "transformers-assisted,transformers-pld,transformers-early-exit", "--assistant-layers", "6",
                 "--categories", "code_edit", "--per-category", "1", "--max-new-tokens", "8", "--json", str(out),
                 "--no-store", "--device", "cpu"])
    rows = json.loads(out.read_text())["rows"]
    assert code == 0
    expected = {"plain", "draft_model:layers=6", "transformers assisted (6 layers)", "transformers prompt lookup",
                "transformers early exit (6 layers)"}
    assert expected <= {r["engine"] for r in rows}
    # greedy self-speculation is lossless in transformers too: in bf16 its tokens agree with plain decoding's
    # up to rounding, so at least the first tokens are the same
    assert all(r["agreement_with_plain"] > 0 for r in rows)


def test_bench_without_llama_cpp_python_says_how_to_get_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as where it is not installed
    # llama.cpp's prompt lookup needs llama-cpp-python (its plain decoding also runs on the prebuilt libraries)
    code, _, err = run_cli(capsys, "bench", "--decode", "prompt_lookup", "--peers", "llama-cpp-pld", *RANDOM,
                           "--categories", "qa", "--per-category", "1", "--no-store")
    assert code == 2 and "pip install llama-cpp-python" in err


def test_bench_llama_cpp_needs_a_gguf_model(capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional; CI does not install it")
    code, _, err = run_cli(capsys, "bench", "--decode", "prompt_lookup", "--peers", "llama-cpp-pld", *RANDOM,
                           "--categories", "qa", "--per-category", "1", "--no-store")
    assert code == 2 and "run a GGUF file" in err


@pytest.mark.integration
def test_bench_compressed_techniques_beside_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional; CI does not install it")
    out = tmp_path / "bench.json"
    code = main(["bench", "--decode", "prompt_lookup", "--compress", "int4:group=32,head=true", "--peers",
                 "llama-cpp,llama-cpp-pld", "--categories", "code_edit", "--per-category", "1",
                 "--max-new-tokens", "8", "--json", str(out), "--no-store", "--device", "cpu"])
    result = json.loads(out.read_text())
    assert code == 0 and result["compress"] == "int4:group=32,head=true"
    rows = {r["engine"]: r for r in result["rows"] if r["category"] == "all"}
    assert {"plain", "prompt_lookup", "llama.cpp Q4_1", "llama.cpp Q4_1 prompt lookup"} <= set(rows)
    # both engines run 4-bit weights of the same GGUF greedily: their first tokens agree
    assert rows["llama.cpp Q4_1"]["agreement_with_plain"] > 0
