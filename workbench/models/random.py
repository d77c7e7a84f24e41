"""Tiny random models for tests: a Hugging Face-style config per supported variant, built in milliseconds."""

from __future__ import annotations

from typing import Any

import torch

from workbench.models.config import ModelConfig
from workbench.models.llama import LlamaModel

# Small but not degenerate: GQA (4 heads over 2 kv heads), several layers, a vocabulary large
# enough for real tokenizers' special ids to be out of range rather than colliding.
_BASE: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)

TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama"),
    "llama3": dict(model_type="llama", rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "smollm": dict(model_type="llama", tie_word_embeddings=True, num_key_value_heads=1),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=32, attention_bias=False),
}


def tiny_hf_config(variant: str, **overrides: Any) -> dict[str, Any]:
    """A config.json-style dict for a tiny model of `variant` (see TINY_VARIANTS)."""
    return {**_BASE, **TINY_VARIANTS[variant], **overrides}


def random_model(variant: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
                 **overrides: Any) -> LlamaModel:
    """A tiny model with weights drawn like a freshly initialised checkpoint (normal, std 0.02)."""
    config = ModelConfig.from_hf(tiny_hf_config(variant, **overrides))
    generator = torch.Generator().manual_seed(seed)
    model = LlamaModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    return model.to(dtype).eval().requires_grad_(False)
