"""llama.cpp's own prebuilt CPU libraries, called through ctypes: greedy decoding of token ids on a GGUF file.

The libraries are the ones npm's `@node-llama-cpp/linux-x64` ships (`make setup` puts them in
`.venv/llama-cpp`; `WORKBENCH_LLAMA_CPP_LIB` names another folder): libllama, libggml and one libggml-cpu per
x86 feature level, of which ggml loads the best this CPU runs (on a Sapphire Rapids VM the AVX-512 and AMX
one). PyPI's llama-cpp-python ships as source only, and a wheel built here crashed in `llama_decode`; these
prebuilt libraries load and run.

Only the C API's stable core is used: load the model and a context with their default parameters (passed as
opaque buffers larger than llama.cpp's structs, which the x86-64 ABI passes in memory; the context length,
the struct's first field, is set), set the threads, decode a batch, read the last row of logits, clear the
cache. Sampling is the argmax of those logits (greedy), done here.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

from workbench.errors import WorkbenchError

LIBRARY = "libllama.v0.5.0.so"
GGML = "libggml.v0.5.0.so"


def library_dir() -> Path:
    """Where the prebuilt libraries are looked for: $WORKBENCH_LLAMA_CPP_LIB, else the venv's llama-cpp folder."""
    return Path(os.environ.get("WORKBENCH_LLAMA_CPP_LIB", Path(sys.prefix) / "llama-cpp"))


def available() -> bool:
    return (library_dir() / LIBRARY).exists()


class _Params(ctypes.Structure):
    _fields_ = [("raw", ctypes.c_uint8 * 1024)]  # llama_model_params / llama_context_params, opaque (<1 KB)


class _Batch(ctypes.Structure):  # struct llama_batch
    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.c_void_p), ("embd", ctypes.c_void_p),
                ("pos", ctypes.c_void_p), ("n_seq_id", ctypes.c_void_p), ("seq_id", ctypes.c_void_p),
                ("logits", ctypes.c_void_p)]


_LOG = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_quiet = _LOG(lambda level, text, data: None)  # llama.cpp logs every load step to stderr otherwise
_lib: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    folder = library_dir()
    if not (folder / LIBRARY).exists():
        raise WorkbenchError(f"the llama-cpp peer needs llama.cpp's prebuilt libraries in {folder}: run `make "
                             "llama-cpp` (fetches them from npm), or set WORKBENCH_LLAMA_CPP_LIB to their folder")
    ggml = ctypes.CDLL(str(folder / GGML), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(folder / LIBRARY), mode=ctypes.RTLD_GLOBAL)
    ggml.ggml_log_set.argtypes = [_LOG, ctypes.c_void_p]
    ggml.ggml_log_set(_quiet, None)
    ggml.ggml_backend_load_all_from_path(str(folder).encode())  # the best libggml-cpu variant for this CPU
    p = ctypes.c_void_p
    signatures = {
        "llama_log_set": ([_LOG, p], None),
        "llama_model_default_params": ([], _Params), "llama_context_default_params": ([], _Params),
        "llama_model_load_from_file": ([ctypes.c_char_p, _Params], p), "llama_init_from_model": ([p, _Params], p),
        "llama_set_n_threads": ([p, ctypes.c_int32, ctypes.c_int32], None),
        "llama_batch_get_one": ([p, ctypes.c_int32], _Batch), "llama_decode": ([p, _Batch], ctypes.c_int32),
        "llama_get_logits_ith": ([p, ctypes.c_int32], ctypes.POINTER(ctypes.c_float)),
        "llama_model_get_vocab": ([p], p), "llama_vocab_n_tokens": ([p], ctypes.c_int32),
        "llama_vocab_eos": ([p], ctypes.c_int32),
        "llama_get_memory": ([p], p), "llama_memory_clear": ([p, ctypes.c_bool], None),
        "llama_free": ([p], None), "llama_model_free": ([p], None), "llama_backend_init": ([], None),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    lib.llama_log_set(_quiet, None)
    lib.llama_backend_init()
    _lib = lib
    return lib


class LlamaCpp:
    """A GGUF model in llama.cpp, `threads` threads, a context of `context` tokens."""

    def __init__(self, gguf: Path, threads: int, context: int = 4096):
        self.lib = lib = _load()
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
        if not self.model:
            raise WorkbenchError(f"llama.cpp could not load {gguf}")
        params = lib.llama_context_default_params()
        ctypes.c_uint32.from_buffer(params.raw, 0).value = context  # n_ctx, the struct's first field
        self.context = lib.llama_init_from_model(self.model, params)
        lib.llama_set_n_threads(self.context, threads, threads)
        vocab = lib.llama_model_get_vocab(self.model)
        self.vocab_size, self.eos = lib.llama_vocab_n_tokens(vocab), lib.llama_vocab_eos(vocab)

    def _next(self, ids: list[int]) -> int:
        """Decode `ids` after what the cache holds; the greedy choice after the last of them."""
        tokens = (ctypes.c_int32 * len(ids))(*ids)
        if self.lib.llama_decode(self.context, self.lib.llama_batch_get_one(tokens, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.context, -1), (self.vocab_size,))
        return int(logits.argmax())

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], float]:
        """Up to n greedy tokens after the prompt `ids` from an empty cache, stopping at EOS, and the seconds
        from the first token to the last (the decode steps, prefill excluded)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.context), True)
        out = [self._next(ids)]
        start = time.perf_counter()
        while len(out) < n and out[-1] != self.eos:
            out.append(self._next(out[-1:]))
        seconds = time.perf_counter() - start
        return (out[:-1] if out[-1] == self.eos else out), seconds

    def __del__(self):
        if getattr(self, "context", None):
            self.lib.llama_free(self.context)
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
