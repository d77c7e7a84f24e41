"""Fill a LlamaModel from a state dict in Hugging Face's naming (what every loader produces)."""

from __future__ import annotations

import torch

from workbench.errors import ModelError
from workbench.models.config import ModelConfig
from workbench.models.llama import LlamaModel, rope_inv_freq


def model_from_hf_state_dict(
    config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> LlamaModel:
    """Build the model from `model.layers.N.self_attn.q_proj.weight`-style tensors, fusing q|k|v and gate|up.

    Tensors are converted to `dtype` one at a time, so peak memory stays near the model's final size.
    """
    with torch.device("meta"):
        model = LlamaModel(config)
    ours: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        try:
            return state.pop(name)
        except KeyError:
            raise ModelError(f"checkpoint is missing tensor {name!r}") from None

    ours["embed.weight"] = take("model.embed_tokens.weight")
    ours["norm"] = take("model.norm.weight")
    if not config.tie_word_embeddings:
        ours["lm_head.weight"] = take("lm_head.weight")
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        q, k, v = (take(p + f"self_attn.{n}_proj.weight") for n in "qkv")
        ours[f"layers.{i}.qkv.weight"] = torch.cat([q, k, v])
        if config.attention_bias:
            ours[f"layers.{i}.qkv.bias"] = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        ours[f"layers.{i}.o.weight"] = take(p + "self_attn.o_proj.weight")
        if config.qk_norm:
            ours[f"layers.{i}.q_norm"] = take(p + "self_attn.q_norm.weight")
            ours[f"layers.{i}.k_norm"] = take(p + "self_attn.k_norm.weight")
        ours[f"layers.{i}.attn_norm"] = take(p + "input_layernorm.weight")
        ours[f"layers.{i}.mlp_norm"] = take(p + "post_attention_layernorm.weight")
        gate, up = take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")
        ours[f"layers.{i}.gate_up.weight"] = torch.cat([gate, up])
        ours[f"layers.{i}.down.weight"] = take(p + "mlp.down_proj.weight")
    state.pop("lm_head.weight", None)  # tied checkpoints sometimes store a copy
    leftover = [k for k in state if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ModelError(f"checkpoint has tensors this architecture does not use: {leftover[:5]}")
    ours = {k: v.to(device=device, dtype=dtype) for k, v in ours.items()}
    model.load_state_dict(ours, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(config).to(device)  # built on the meta device: set it for real
    return model.eval().requires_grad_(False)
