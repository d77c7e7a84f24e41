"""Read a GGUF file (llama.cpp's format) into a ModelConfig and float32 tensors in Hugging Face naming.

Three things differ from a Hugging Face checkpoint, and each is undone here:
- names: `blk.N.attn_q.weight` is `model.layers.N.self_attn.q_proj.weight`;
- shapes: GGUF lists dimensions innermost first (ne order); the reader's arrays are already in row-major
  order, so a matrix comes out as [out_features, in_features] like `nn.Linear.weight`;
- RoPE layout: llama.cpp's converter permutes the rows of q and k of llama-arch models (Llama, Mistral,
  SmolLM) so that rotated pairs are adjacent (interleaved RoPE). Our model rotates pairs (i, i + dim/2),
  Hugging Face's layout, so those rows are permuted back. Qwen2/Qwen3 files are stored unpermuted.
Quantized blocks are expanded with `gguf.quants.dequantize`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize

from workbench.errors import ModelError
from workbench.models.config import ModelConfig
from workbench.models.llama import rope_inv_freq

Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# Architectures whose q/k rows llama.cpp's converter permutes (LlamaModel.permute in convert_hf_to_gguf.py).
_PERMUTED_ARCHITECTURES = ("llama", "mistral")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Llama 3.1+ files carry the "llama3" RoPE scaling as per-frequency divisors, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read `path` into (config, float32 tensors named like `model.layers.0.self_attn.q_proj.weight`)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ModelError(f"{path} is not a readable GGUF file: {e}") from None
    tensors = {t.name: t for t in reader.tensors}
    config = _config(reader, tensors, path)
    names = {name: _hf_name(name) for name in tensors if name != _ROPE_FREQS}  # rope_freqs is in config
    for tensor in tensors.values():  # fail before seconds of dequantizing, not after
        _check_type(tensor)
    permute = config.arch in _PERMUTED_ARCHITECTURES
    state: dict[str, torch.Tensor] = {}
    for name, hf_name in names.items():
        w = _dequantize(tensors[name])
        if permute and ".attn_q." in name:
            w = unpermute_rope_rows(w, config.num_heads)
        elif permute and ".attn_k." in name:
            w = unpermute_rope_rows(w, config.num_kv_heads)
        state[hf_name] = w
    return config, state


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, row 2j + t goes back to row t * dim/2 + j.

    w: [n_heads * head_dim, ...] (a weight or a bias).
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ModelError(
        f"GGUF tensor {name!r} is not part of a Llama-family model; known tensors: "
        f"{', '.join(_GLOBAL_NAMES)}, blk.N.{{{', '.join(_LAYER_NAMES)}}}"
    )


def _check_type(tensor: ReaderTensor) -> None:
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise ModelError(
            f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which this loader does not read; "
            f"supported types: {', '.join(t.name for t in SUPPORTED_TYPES)}"
        )


def _dequantize(tensor: ReaderTensor) -> torch.Tensor:
    """Expand one tensor to float32 in row-major (Hugging Face) orientation."""
    _check_type(tensor)
    w = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # ne order -> row-major
    if w.shape != shape:
        raise ModelError(f"GGUF tensor {tensor.name!r}: data of shape {w.shape} does not match {shape}")
    if not w.flags.writeable:  # F32 comes back as a view of the memory-mapped file
        w = w.copy()
    return torch.from_numpy(w.astype(np.float32, copy=False))


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    if field.types == [GGUFValueType.FLOAT32]:  # 1e-6 rather than 9.99999997e-07, as in config.json
        return float(str(np.float32(field.contents())))
    return field.contents()


def _config(reader: GGUFReader, tensors: dict[str, ReaderTensor], path: Path) -> ModelConfig:
    gguf_arch = _field(reader, "general.architecture")
    if gguf_arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelError(
            f"{path.name}: GGUF architecture {gguf_arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )

    def meta(key: str, default: Any = None) -> Any:
        value = _field(reader, f"{gguf_arch}.{key}", default)
        if value is None:
            raise ModelError(f"{path.name}: GGUF metadata {gguf_arch}.{key} is missing")
        return value

    # llama.cpp writes Mistral models as "llama"; only the name tells them apart (as in transformers).
    arch = gguf_arch
    if arch == "llama" and "mistral" in str(_field(reader, "general.name", "")).lower():
        arch = "mistral"
    if "token_embd.weight" not in tensors:
        raise ModelError(f"{path.name}: GGUF file has no token_embd.weight tensor")
    scaling = meta("rope.scaling.type", "none")
    if scaling != "none":
        raise ModelError(f"{path.name}: RoPE scaling {scaling!r} is not supported; supported: none, llama3")
    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = meta("attention.key_length", meta("rope.dimension_count", hidden // heads))
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):  # every id llama.cpp ends generation on
        token = _field(reader, f"tokenizer.ggml.{key}")
        if token is not None and int(token) not in eos_ids:
            eos_ids.append(int(token))
    config = ModelConfig(
        arch=arch,
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # ne order: [hidden, vocab]
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=int(head_dim),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
    )
    if _ROPE_FREQS in tensors:
        divisors = _dequantize(tensors[_ROPE_FREQS]).double()
        config.rope_scaling = _llama3_scaling(config, divisors)
        if config.rope_scaling is None and not torch.allclose(divisors, torch.ones_like(divisors)):
            raise ModelError(
                f"{path.name}: {_ROPE_FREQS} does not follow Llama 3's RoPE scaling; "
                "supported: no scaling, or llama3 scaling"
            )
    return config


def _llama3_scaling(config: ModelConfig, divisors: torch.Tensor) -> dict[str, Any] | None:
    """Recover Llama 3.1's rope_scaling dict from llama.cpp's per-frequency divisors [head_dim / 2].

    llama3 scaling divides each inverse frequency by 1 (short wavelengths), by `factor` (long ones) or by
    a blend whose weight is linear in 1 / wavelength: smooth = (old_len / wavelen - low) / (high - low).
    Only the ratios of (old_len, low, high) matter, so low = 1; high and old_len come from a line fit
    through the blended frequencies, or, with fewer than two of those, high = 4 (as in every Llama 3.x
    release). Returns None when no candidate reproduces the divisors, or when nothing is scaled.
    """
    factor = float(divisors.max())
    if math.isclose(factor, 1.0, rel_tol=1e-6):
        return None
    base = rope_inv_freq(ModelConfig(**{**config.to_dict(), "rope_scaling": None})).double()
    x = base / (2 * math.pi)  # 1 / wavelength
    kept, scaled = divisors < 1 + 1e-6, divisors > factor * (1 - 1e-6)
    mid = ~kept & ~scaled
    smooth = (1 / divisors[mid] - 1 / factor) / (1 - 1 / factor)
    if int(mid.sum()) >= 2:  # smooth = a * x - b with a = old_len / (high - 1), b = 1 / (high - 1)
        design = torch.stack([x[mid], -torch.ones_like(x[mid])], dim=1)
        a, b = torch.linalg.lstsq(design, smooth[:, None]).solution.flatten().tolist()
        if b <= 0:
            return None
        high, old_len = 1 + 1 / b, a / b
    elif int(mid.sum()) == 1:
        high = 4.0
        old_len = float(smooth[0] + 1 / (high - 1)) / float(x[mid][0]) * (high - 1)
    else:  # any old_len between the two groups' wavelengths reproduces the divisors
        high = 4.0
        longest_kept = float(1 / x[kept].min()) if bool(kept.any()) else 0.0
        old_len = max(math.sqrt(high * longest_kept * float(1 / x[scaled].max())), high * longest_kept)
    scaling = dict(rope_type="llama3", factor=_tidy(factor), low_freq_factor=1.0, high_freq_factor=_tidy(high),
                   original_max_position_embeddings=_tidy(old_len))
    fitted = rope_inv_freq(ModelConfig(**{**config.to_dict(), "rope_scaling": scaling})).double()
    return scaling if torch.allclose(base / fitted, divisors, rtol=1e-4, atol=0) else None


def _tidy(x: float) -> float:
    """8192.0 rather than 8191.99916: the float32 divisors only pin the fitted values down to ~1e-6."""
    nearest = round(x)
    return float(nearest) if nearest and abs(x - nearest) <= 1e-4 * abs(nearest) else x
