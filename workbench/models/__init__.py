"""Model loading: one call from a name or path to a ready model, its tokenizer and where it came from.

`load_model` accepts the embedded default model ("smollm2-135m"), a .gguf file, a Hugging Face checkpoint
folder, a hub id already in the local Hugging Face cache, or "random:<variant>" (a tiny random model for
tests). Every loader produces tensors in Hugging Face naming; `model_from_hf_state_dict` builds the model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from workbench.errors import DeviceError, ModelError
from workbench.models import embedded
from workbench.models.config import ModelConfig
from workbench.models.gguf import read_gguf
from workbench.models.hf import hf_folder, read_hf
from workbench.models.llama import LlamaModel
from workbench.models.packed_linear import PackedLinear
from workbench.models.random import TINY_VARIANTS, random_model
from workbench.models.tokenizer import has_tokenizer, load_tokenizer
from workbench.models.weights import model_from_hf_state_dict

DEFAULT_MODEL = embedded.EMBEDDED_NAME
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
RANDOM_PREFIX = "random:"


@dataclass
class LoadedModel:
    """A model ready to run, with what surfaces and the store need to know about it."""

    model: LlamaModel
    tokenizer: PreTrainedTokenizerBase | None  # None for random models and checkpoints without one
    config: ModelConfig
    name: str  # what the user asked for
    source: str  # the file or folder read
    dtype: torch.dtype
    device: torch.device
    compression: list[Any] = field(default_factory=list)  # TransformReports of the weight transforms applied

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: the checkpoint's (config and generation config) and the tokenizer's."""
        ids = list(self.config.eos_token_ids)
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        # an id past the model's vocabulary can never be generated (some GGUF tokenizer conversions add one)
        return ids if eos is None or eos in ids or eos >= self.config.vocab_size else [*ids, eos]

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ids, special tokens left out; without a tokenizer each id shows as <id>."""
        if self.tokenizer is None:
            return "".join(f"<{i}>" for i in ids)
        # The config's BOS/EOS are dropped too: some transformers versions don't mark a GGUF tokenizer's
        # <s> and </s> as special.
        special = {self.config.bos_token_id, *self.config.eos_token_ids}
        return self.tokenizer.decode([i for i in ids if i not in special], skip_special_tokens=True)

    def weight_bytes(self) -> int:
        """Bytes the weights hold in memory, tied tensors counted once (packed linears included). Compressed
        layers keep every tensor as a buffer or parameter (compression/base.py), so their real bytes count."""
        tensors = [*self.model.parameters(), *self.model.buffers()]  # both skip shared duplicates
        total = sum(t.numel() * t.element_size() for t in tensors)
        return total + sum(m.packed_nbytes() for m in self.model.modules() if isinstance(m, PackedLinear))


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """Load a model by name or path onto `device` ("auto", "cpu", "cuda", "cuda:N") in `dtype`
    ("auto", "float32", "bfloat16", "float16"); see the module docstring for what a name can be."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name = name_or_path.strip()
    tokenizer: PreTrainedTokenizerBase | None = None
    if name.startswith(RANDOM_PREFIX):
        variant = name[len(RANDOM_PREFIX):]
        if variant not in TINY_VARIANTS:
            raise ModelError(f"unknown random variant {variant!r}; valid: "
                             + ", ".join(RANDOM_PREFIX + v for v in TINY_VARIANTS))
        model = random_model(variant, dtype=dt).to(dev)
        return LoadedModel(model, None, model.config, name, name, dt, dev)
    if name.lower() in embedded.EMBEDDED_ALIASES:
        path = embedded.embedded_gguf_path()
        config, state, tokenizer = embedded.read_gguf_cached(path, embedded.EMBEDDED_NAME)
        source = str(path)
    elif name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        config, state = read_gguf(path)
        tokenizer, source = load_tokenizer(path), str(path)
    else:  # a folder, or a hub id in the local cache (read_hf says what is valid if neither)
        config, state, folder = read_hf(name)
        tokenizer, source = (load_tokenizer(folder) if has_tokenizer(folder) else None), str(folder)
    model = model_from_hf_state_dict(config, state, dt, dev)
    return LoadedModel(model, tokenizer, config, name, source, dt, dev)


def load_model_tokenizer(name_or_path: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase | None:
    """Only the tokenizer `load_model(name_or_path)` would give (None for random models and folders without
    one), without reading the weights: for building prompts before any model loads (sweeps)."""
    name = name_or_path.strip()
    if name.startswith(RANDOM_PREFIX):
        return None
    if name.lower() in embedded.EMBEDDED_ALIASES:
        path = embedded.embedded_gguf_path()
        folder = embedded.cache_folder(path, embedded.EMBEDDED_NAME)
        return load_tokenizer(folder if (folder / "model.safetensors").is_file() else path)
    if name.lower().endswith(".gguf"):
        return load_tokenizer(Path(name).expanduser())
    folder = hf_folder(name)
    return load_tokenizer(folder) if has_tokenizer(folder) else None


def resolve_device(name: str) -> torch.device:
    """"auto" is cuda when available, else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DeviceError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but torch sees no CUDA GPU; valid here: auto, cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"no GPU {device.index}; valid: cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype for `name` on `device`.

    "auto" picks the fastest dtype that keeps quality: bfloat16 on GPUs that support it (float16 on older
    ones), bfloat16 on CPUs with native bf16 instructions (AVX512-BF16 or AMX), float32 on other CPUs,
    where bfloat16 matrix products are emulated and slower than float32.
    """
    device = torch.device(device)
    key = _DTYPE_ALIASES.get(name, name)
    if key != "auto" and key not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; valid: auto, {', '.join(DTYPES)}")
    if device.type == "cuda":
        resolve_device(str(device))  # a clear error, not torch's, when there is no such GPU
        # Native bf16 from Ampere (compute capability 8) on; older cards only emulate it, slowly.
        bf16 = bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
        if key == "auto":
            return torch.bfloat16 if bf16 else torch.float16
        if key == "bfloat16" and not bf16:
            raise DeviceError(f"this GPU ({torch.cuda.get_device_name(device)}) cannot run bfloat16; "
                              "valid: auto, float32, float16")
        return DTYPES[key]
    if key == "auto":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return DTYPES[key]


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether torch runs bfloat16 natively here: an AVX512 build on a CPU with avx512_bf16 or amx_bf16."""
    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


__all__ = ["DEFAULT_MODEL", "DTYPES", "LoadedModel", "cpu_has_fast_bf16", "load_model", "resolve_device",
           "resolve_dtype"]
