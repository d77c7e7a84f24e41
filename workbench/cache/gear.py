"""GEAR: low-bit quantization plus a low-rank approximation of its error plus sparse outliers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.quantized import (
    RAW_HEADS_HELP,
    SKIP_LAYERS_HELP,
    Codec,
    CompressedPolicy,
    dequantize_minmax,
    pack_bits,
    quantize_minmax,
    unpack_bits,
)
from workbench.models.config import ModelConfig
from workbench.registry import param, register


class GearCodec(Codec):
    """Per group of `group` tokens and per head: outliers (the `outliers` fraction of largest magnitudes of
    each token) held apart as (channel int16, value float16); the rest quantized KIVI-style (keys per channel,
    values per token); the residual error's rank-`rank` approximation A @ B with A per token, B per group."""

    def __init__(self, bits: int, group: int, rank: int, outliers: float, head_dim: int):
        self.bits, self.group, self.rank, self.head_dim = bits, group, rank, head_dim
        self.n_out = round(head_dim * outliers)

    def _encode(self, name: str, x: torch.Tensor):
        h, g, t, d = x.shape
        x = x.float()
        ignore = torch.zeros_like(x, dtype=torch.bool)
        tok = {}
        if self.n_out:
            idx = x.abs().topk(self.n_out, dim=-1).indices
            ignore.scatter_(-1, idx, True)
            tok[f"{name}_out_idx"] = idx.reshape(h, g * t, -1).to(torch.int16)
            tok[f"{name}_out_val"] = x.gather(-1, idx).reshape(h, g * t, -1).to(torch.float16)
        axis = 2 if name == "k" else 3  # keys per channel over the group's tokens, values per token
        codes, scale, mn = quantize_minmax(x, axis, self.bits, ignore)
        approx = dequantize_minmax(codes, scale, mn).masked_scatter(ignore, x[ignore])
        tok[name] = pack_bits(codes.reshape(h, g * t, d), self.bits)
        grp = {}
        if name == "k":
            grp["k_scale"], grp["k_min"] = scale[:, :, 0], mn[:, :, 0]
        else:
            tok["v_scale"], tok["v_min"] = scale.reshape(h, g * t, 1), mn.reshape(h, g * t, 1)
        if self.rank:
            u, s, vh = torch.linalg.svd(x - approx, full_matrices=False)  # [h, g, t, t], [h, g, min], ...
            r = min(self.rank, s.shape[-1])
            tok[f"{name}_a"] = (u[..., :r] * s[..., None, :r]).reshape(h, g * t, r).to(torch.float16)
            grp[f"{name}_b"] = vh[..., :r, :].to(torch.float16)  # [h, g, r, dim]
        return tok, grp

    def encode(self, k, v):
        tk, gk = self._encode("k", k)
        tv, gv = self._encode("v", v)
        return {**tk, **tv}, {**gk, **gv}

    def _decode(self, name: str, tok, grp):
        codes = unpack_bits(tok[name], self.bits)
        if name == "k":
            x = dequantize_minmax(codes, grp["k_scale"], grp["k_min"])
        else:
            x = dequantize_minmax(codes, tok["v_scale"], tok["v_min"])
        if self.rank:
            x = x + torch.einsum("hnr,hnrd->hnd", tok[f"{name}_a"].float(), grp[f"{name}_b"].float())
        if self.n_out:
            x = x.scatter(-1, tok[f"{name}_out_idx"].long(), tok[f"{name}_out_val"].float())
        return x

    def decode(self, tok, grp):
        return self._decode("k", tok, grp), self._decode("v", tok, grp)


@register("cache", "gear", lossless=False)
@dataclass
class GearPolicy(CompressedPolicy):
    """GEAR: an efficient KV cache compression recipe for near-lossless generative inference.

    "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference of LLM"
    (arXiv 2403.05527). Each committed chunk is decomposed as X ≈ D + L + S: S holds the few largest-magnitude
    entries (filtered before quantizing so they don't stretch the range), D is a low-bit quantization of the
    rest (KIVI-style grouping: keys per channel, values per token), and L = A @ B is a rank-r approximation of
    the remaining quantization error (here an exact truncated SVD per head and chunk; the paper uses power
    iteration). Recent tokens stay in a full-precision window and are compressed in chunks of `group` as in
    GEAR's streaming buffer. Left out: the paper's fused kernels, power iteration, and its per-head adaptive
    rank; outliers are chosen per token (a fixed count each, so the sparse part is rectangular).
    """

    bits: int = param(4, "bits per quantized element", choices=[2, 4])
    rank: int = param(4, "rank of the error approximation per head and chunk (0: none)", min=0, max=256)
    outliers: float = param(0.02, "fraction of each token's entries held apart as sparse outliers",
                            min=0.0, max=0.5)
    group: int = param(64, "tokens per compressed chunk (keys share a scale per channel over it)", min=1, max=4096)
    residual: int = param(64, "full-precision window: compress once this many committed tokens are raw",
                          min=0, max=1 << 20)
    skip_layers: str = param("", SKIP_LAYERS_HELP)
    raw_heads: str = param("", RAW_HEADS_HELP)

    def codec(self, layer: int, config: ModelConfig, dtype: torch.dtype) -> Codec:
        return GearCodec(self.bits, self.group, self.rank, self.outliers, config.head_dim)
