"""KIVI: 2- or 4-bit KV cache, keys quantized per channel and values per token, with a residual window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.quantized import (
    RAW_HEADS_HELP,
    SKIP_LAYERS_HELP,
    Codec,
    CompressedPolicy,
    channels_per_block,
    dequantize_minmax,
    pack_bits,
    quantize_minmax,
    unpack_bits,
)
from workbench.models.config import ModelConfig
from workbench.registry import param, register


class KiviCodec(Codec):
    """Keys: per channel over a group of `group` tokens; values: per token over groups of `channels`.

    Storage layout of one layer (a CompressedLayerCache with this codec; what a kernel reading the codes needs).
    H = the coded kv heads (all of them unless `raw_heads`), N = compressed tokens, in slot order (oldest first),
    d = head_dim, b = bits, G = group, c = channels, per = 8 // b codes per byte. Keys are cached after RoPE.
    - `tok["k"]`, `tok["v"]`: uint8 [H, N, d * b / 8]; byte j of a token holds channels j*per .. j*per + per - 1,
      channel j*per + i in bits i*b .. i*b + b - 1 (`pack_bits`). Codes are unsigned, 0 .. 2**b - 1.
    - Keys: `grp["k_scale"]`, `grp["k_min"]`: float16 [H, groups, d]; k = code * scale + min with the scale and
      minimum of the token's group and channel. Token i's group is i // G while `gidx` is None; after an eviction
      moved tokens, `gidx` [1 or H, N] (int16, int32 past 32767 groups) holds it. Groups hold G tokens when
      encoded; evictions may leave fewer, never re-encoding.
    - Values: `tok["v_scale"]`, `tok["v_min"]`: float16 [H, N, d / c]; v = code * scale + min with the scale and
      minimum of the token and its group of c consecutive channels.
    - Positions: `cpos` int32 [1 or kv_heads, N] (1 row while every head holds the same tokens), or None while
      they are cpos_start, cpos_start + 1, ... .
    - The residual window: `raw`, a DenseLayerCache, k and v [kv_heads, capacity, d] in the model's dtype and
      int64 positions, after the N compressed slots in order: the committed tokens not yet quantized (fewer
      than max(residual, G) after each flush) and the uncommitted ones (drafts). Its capacity is
      max(residual, G) + RAW_SPARE slots; a prompt or a large tree grows it and the next flush shrinks it back,
      so no buffer of the model's dtype spans the context.
    - `raw_heads`: `full["k"]`, `full["v"]` [raw heads, N, d] in the model's dtype, for the heads left uncoded.
    """

    attention_operation = "kivi_attention"  # kernels/triton_kivi.py reads this layout

    def __init__(self, bits: int, group: int, channels: int):
        self.bits, self.group, self.channels = bits, group, channels

    def encode(self, k, v):
        h, g, t, d = k.shape
        kc, ks, km = quantize_minmax(k, 2, self.bits)  # min/max over the group's tokens, per channel
        vc, vs, vm = quantize_minmax(v.reshape(h, g, t, d // self.channels, self.channels), 4, self.bits)
        tok = {"k": pack_bits(kc.reshape(h, g * t, d), self.bits), "v": pack_bits(vc.reshape(h, g * t, d), self.bits),
               "v_scale": vs.reshape(h, g * t, -1), "v_min": vm.reshape(h, g * t, -1)}
        return tok, {"k_scale": ks[:, :, 0], "k_min": km[:, :, 0]}

    def decode(self, tok, grp):
        k = dequantize_minmax(unpack_bits(tok["k"], self.bits), grp["k_scale"], grp["k_min"])
        h, n, d = k.shape
        codes = unpack_bits(tok["v"], self.bits).view(h, n, d // self.channels, self.channels)
        v = dequantize_minmax(codes, tok["v_scale"][..., None], tok["v_min"][..., None])
        return k, v.view(h, n, d)


@register("cache", "kivi", lossless=False)
@dataclass
class KiviPolicy(CompressedPolicy):
    """KIVI: tuning-free asymmetric 2-bit KV cache quantization.

    "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (arXiv 2402.02750). Key outliers sit in
    fixed channels, so keys are quantized per channel (min/max over a group of `group` tokens); values are
    quantized per token (min/max over `channels` consecutive channels). The most recent tokens stay in a
    full-precision residual window; when it holds `residual` committed tokens they are quantized in groups
    (asymmetric round-to-nearest, float16 scale and minimum, codes bit-packed). Drafts stay raw until
    committed. The layer holds only the codes, their scales and the residual window (layout: KiviCodec), so the
    bytes the process holds shrink with the codes. A one-token step's attention reads the codes in a fused
    kernel where one runs (kernels/triton_kivi.py, on CUDA); elsewhere, and for trees and raw heads, K/V are
    dequantized per step. Left out: the paper's defaults (group 32, residual 128) are replaced by group
    64 / residual 64 so the scales and the window fit the byte bars at 2k tokens (see docs/cache.md).
    """

    bits: int = param(4, "bits per quantized element", choices=[2, 4])
    group: int = param(64, "tokens per key group (keys share a scale per channel over a group)", min=1, max=4096)
    channels: int = param(64, "channels per value group (values share a scale per token over a group; "
                              "at most head_dim)", min=1, max=1024)
    residual: int = param(64, "full-precision window: quantize once this many committed tokens are raw",
                          min=0, max=1 << 20)
    skip_layers: str = param("", SKIP_LAYERS_HELP)
    raw_heads: str = param("", RAW_HEADS_HELP)

    def codec(self, layer: int, config: ModelConfig, dtype: torch.dtype) -> Codec:
        channels = channels_per_block("kivi", "channels", self.channels, config.head_dim)
        return KiviCodec(self.bits, self.group, channels)
