"""Block floating point (MX-style) K and V, with outlier-aware channel rearrangement."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.quantized import (
    RAW_HEADS_HELP,
    SKIP_LAYERS_HELP,
    Codec,
    CompressedPolicy,
    channels_per_block,
    pack_bits,
    unpack_bits,
)
from workbench.models.config import ModelConfig
from workbench.registry import param, register


class BlockFPCodec(Codec):
    """Per token, blocks of `block` channels share a power-of-two scale (an int8 exponent, MX's E8M0);
    each element is a signed `bits`-bit integer mantissa. With `reorder`, channels are permuted per head
    (by magnitude, fixed at the first flush: the prefill) before blocking, and un-permuted at decode."""

    group = 1

    def __init__(self, bits: int, block: int, reorder: bool):
        self.bits, self.block, self.reorder = bits, block, reorder
        self.perm: dict[str, torch.Tensor] = {}  # "k"/"v" -> [kv_heads, dim] int16, chosen once

    def _permutation(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in self.perm:
            # Sort channels by their largest magnitude so outlier channels share blocks (and their large
            # exponent) instead of raising the exponent of every block they would otherwise sit in.
            self.perm[name] = x.abs().amax(dim=(1, 2)).argsort(dim=-1).to(torch.int16)
        return self.perm[name].long()

    def _encode(self, name: str, x: torch.Tensor):
        h, g, t, d = x.shape
        x = x.reshape(h, g * t, d).float()
        if self.reorder:
            x = x.gather(2, self._permutation(name, x[:, None])[:, None].expand(-1, g * t, -1))
        blocks = x.view(h, g * t, d // self.block, self.block)
        qmax = 2 ** (self.bits - 1) - 1
        amax = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        exp = torch.ceil(torch.log2(amax / qmax)).clamp_(-127, 127)
        mant = (blocks / torch.exp2(exp)).round_().clamp_(-qmax, qmax)
        codes = (mant + qmax).to(torch.uint8).view(h, g * t, d)  # offset to unsigned for packing
        return {name: pack_bits(codes, self.bits), f"{name}_exp": exp[..., 0].to(torch.int8)}

    def encode(self, k, v):
        return {**self._encode("k", k), **self._encode("v", v)}, {}

    def _decode(self, name: str, tok):
        qmax = 2 ** (self.bits - 1) - 1
        codes = unpack_bits(tok[name], self.bits).float() - qmax
        h, n, d = codes.shape
        x = (codes.view(h, n, d // self.block, self.block) * torch.exp2(tok[f"{name}_exp"].float())[..., None])
        x = x.view(h, n, d)
        if self.reorder:
            inverse = self.perm[name].long().argsort(dim=-1)
            x = x.gather(2, inverse[:, None].expand(-1, n, -1))
        return x

    def extra_nbytes_per_head(self) -> int:
        return sum(p[0].numel() * p.element_size() for p in self.perm.values())

    def decode(self, tok, grp):
        return self._decode("k", tok), self._decode("v", tok)


@register("cache", "block_fp", lossless=False)
@dataclass
class BlockFPPolicy(CompressedPolicy):
    """Block floating point / MX formats for K and V, with channel rearrangement for outliers.

    Shared-exponent formats (MXINT, "Microscaling Data Formats", arXiv 2310.10537) give each block of
    `block` channels of a token one power-of-two scale and each element a `bits`-bit signed mantissa.
    "Accurate Block Quantization in LLMs with Outliers" (arXiv 2403.20137) observes that K's outlier channels
    force large exponents on every block they fall in, and rearranges channels so outliers share blocks. The
    paper permutes Wq and Wk offline (q·k is invariant under a shared permutation of their channels); here the
    permutation is chosen per layer and head from the prefill's channel magnitudes and undone at dequantization,
    so queries are untouched (the permutation costs 2 bytes per channel per head, counted). Left out: offline
    calibration, the MX float-element variants (MXFP8/6/4), and kernels computing on the block form.
    """

    bits: int = param(8, "mantissa bits per element, sign included (MXINT8: 8)", choices=[4, 8])
    block: int = param(32, "channels sharing one exponent (MX: 32)", min=2, max=1024)
    reorder: bool = param(True, "rearrange channels so outlier channels share blocks (arXiv 2403.20137)")
    residual: int = param(0, "most recent committed tokens kept in full precision", min=0, max=1 << 20)
    skip_layers: str = param("", SKIP_LAYERS_HELP)
    raw_heads: str = param("", RAW_HEADS_HELP)

    def codec(self, layer: int, config: ModelConfig, dtype: torch.dtype) -> Codec:
        block = channels_per_block("block_fp", "block", self.block, config.head_dim)
        return BlockFPCodec(self.bits, block, self.reorder)
