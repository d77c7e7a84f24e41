"""llama.cpp's prebuilt libraries as the llama-cpp peer (workbench/eval/llama_cpp_lib.py): a clear error without
them, the same greedy tokens as the workbench on the embedded GGUF, and `bench --roofline --peers llama-cpp`."""

import json

import pytest
import torch

from workbench import Workbench
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.eval import llama_cpp_lib
from workbench.eval.llama_cpp_peer import llama_cpp_peer
from workbench.eval.roofline import gguf_read_bytes
from workbench.models.embedded import embedded_gguf_path

needs_libraries = pytest.mark.skipif(not llama_cpp_lib.available(),
                                     reason="llama.cpp's prebuilt libraries are missing (make llama-cpp fetches them)")


def test_without_the_libraries_the_peer_says_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_LLAMA_CPP_LIB", str(tmp_path))
    monkeypatch.setattr(llama_cpp_lib, "_lib", None)
    assert not llama_cpp_lib.available()
    with pytest.raises(WorkbenchError, match="make llama-cpp"):
        llama_cpp_lib.LlamaCpp(embedded_gguf_path(), 1)


@needs_libraries
def test_the_peer_runs_a_gguf_file_only(tmp_path):
    with pytest.raises(WorkbenchError, match="run a GGUF file"):
        llama_cpp_peer(tmp_path / "model.safetensors", prompt_lookup=False)


@pytest.fixture
def one_thread():
    # llama.cpp's threads spin while they wait for each other: with more busy threads than cores (a shared
    # test machine) two of them crawl, so the check runs on one (the figures in docs use both)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_libraries
@pytest.mark.integration
def test_greedy_tokens_match_the_workbench_on_the_same_gguf(tmp_path, one_thread):
    wb = Workbench()  # the embedded SmolLM2-135M, loaded from the same Q4_1 GGUF
    trace = wb.generate("The capital of France is", "decode=plain;max_new_tokens=8;ignore_eos=true")
    run = llama_cpp_peer(embedded_gguf_path(), prompt_lookup=False, decode_only=True)
    tokens, seconds, _, ids = run(trace.prompt_ids, 8)
    assert tokens == len(ids) - 1 and seconds > 0
    # both decode the same 4-bit weights greedily (llama.cpp quantizes activations to 8 bits in its products, the
    # workbench does not), so the first tokens agree
    assert ids[:4] == trace.token_ids[:4]

    out = tmp_path / "roofline.json"
    code = main(["bench", "--roofline", "--format", "int4:group=32,head=true", "--peers", "llama-cpp",
                 "--prompts", "1", "--repeats", "1", "--max-new-tokens", "6", "--bandwidth-bytes", "4000000",
                 "--no-store", "--json", str(out)])
    rows = {r["engine"]: r for r in json.loads(out.read_text())["rows"]}
    assert code == 0 and rows["llama.cpp Q4_1"]["tok_per_s"] > 0
    assert rows["llama.cpp Q4_1"]["read_bytes"]["gguf_tensors"] == gguf_read_bytes(embedded_gguf_path())
