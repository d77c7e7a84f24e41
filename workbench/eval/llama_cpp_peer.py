"""llama.cpp as a peer in `workbench bench --decode` and `--roofline`, on the same GGUF file.

llama.cpp runs the GGUF's own quantized weights (the embedded model is Q4_1: 4-bit codes with a scale and a
minimum per 32 weights, the format `int4:group=32` reproduces), with as many threads as torch uses. Its
prompt lookup is llama-cpp-python's `LlamaPromptLookupDecoding` (n-grams up to 2, 10 drafted tokens, the
settings of the prompt-lookup reference code). Each prompt starts from an empty cache (no prefix reuse),
greedy, and stops at EOS or after the same number of new tokens as the workbench's runs.

Plain decoding (`llama-cpp`) runs llama.cpp's prebuilt libraries through ctypes (workbench/eval/
llama_cpp_lib.py; `make setup` fetches them) where they are, else llama-cpp-python. Prompt lookup
(`llama-cpp-pld`) needs llama-cpp-python, which PyPI ships as source only (`pip install llama-cpp-python`
builds it, 10-20 minutes on two cores). Without them, asking for these peers is a clear error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.eval import llama_cpp_lib

LLAMA_CPP_PEERS = ("llama-cpp", "llama-cpp-pld")


def llama_cpp_peer(gguf: Path, prompt_lookup: bool,
                   decode_only: bool = False) -> Callable[[list[int], int], tuple[int, float, int, list[int]]]:
    """A function (prompt ids, max new tokens) -> (new tokens, seconds, 0, their ids) running llama.cpp.
    With `decode_only`, the tokens and seconds are those after the first token (prefill excluded)."""
    if not prompt_lookup and llama_cpp_lib.available():
        return _prebuilt_peer(_checked_gguf(gguf), decode_only)
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        raise WorkbenchError("llama-cpp-pld needs llama-cpp-python (pip install llama-cpp-python); llama-cpp needs it "
                             "or llama.cpp's prebuilt libraries (make llama-cpp)" if prompt_lookup else
                             "the llama-cpp peer needs llama.cpp's prebuilt libraries (make llama-cpp) or "
                             "llama-cpp-python (pip install llama-cpp-python)") from None
    _checked_gguf(gguf)
    draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if prompt_lookup else None
    threads = torch.get_num_threads()
    llm = Llama(str(gguf), n_ctx=4096, n_threads=threads, n_threads_batch=threads, draft_model=draft,
                verbose=False)
    eos = llm.token_eos()

    def run(ids: list[int], n: int) -> tuple[int, float, int, list[int]]:
        llm.reset()  # no prefix reuse between prompts: every engine prefills every prompt
        out: list[int] = []
        t0 = time.perf_counter()
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            if token == eos:
                break
            out.append(token)
            if len(out) == 1 and decode_only:
                t0 = time.perf_counter()
            if len(out) == n:
                break
        seconds = time.perf_counter() - t0
        return (len(out) - 1 if decode_only else len(out)), seconds, 0, out

    return run


def _checked_gguf(gguf: Path) -> Path:
    if gguf.suffix != ".gguf" or not gguf.exists():
        raise WorkbenchError(f"the llama.cpp peers run a GGUF file; the model's source is {str(gguf)!r}")
    return gguf


def _prebuilt_peer(gguf: Path, decode_only: bool) -> Callable[[list[int], int], tuple[int, float, int, list[int]]]:
    """The same function on llama.cpp's prebuilt libraries (greedy, its own argmax)."""
    model = llama_cpp_lib.LlamaCpp(gguf, torch.get_num_threads())

    def run(ids: list[int], n: int) -> tuple[int, float, int, list[int]]:
        start = time.perf_counter()
        out, decode_seconds = model.greedy(ids, n)
        if decode_only:
            return len(out) - 1, decode_seconds, 0, out
        return len(out), time.perf_counter() - start, 0, out

    return run
