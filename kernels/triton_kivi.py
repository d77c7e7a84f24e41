"""Triton decode attention over a KIVI cache, reading the packed codes directly (no dequantized copy).

KIVI [arXiv 2402.02750] stores keys quantized per channel (a scale and minimum per channel over a group of G
tokens) and values per token (a scale and minimum per token over groups of c channels), bit-packed, plus a
full-precision residual window of the newest tokens (layout: `workbench.cache.kivi.KiviCodec`). The paper's
speed comes from fused kernels that dequantize inside the attention product; this is that kernel for one
decoding step: each program takes one kv head and one chunk of the compressed tokens, unpacks the 2- or 4-bit
codes of a block of keys in registers, applies the group's per-channel scale and minimum, runs the online
softmax, then does the same for the values with their per-token scales. The residual window runs through the
dense chunk kernel into the same partial results (`triton_attention.Partials`), and one merge combines both.

Left out: heads kept raw (`raw_heads`) and tree verification (several query rows with a mask) over the codes,
which still take the reference (dequantize, then attend). The model calls it through the `kivi_attention`
operation (`backend_triton`), which a KIVI layer names as its `attention_operation` (docs/kernels.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workbench.kernels.triton_attention import BLOCK_S, Partials, attention, chunk_size


@triton.jit
def _kivi_chunk_kernel(q_ptr, kc_ptr, vc_ptr, ks_ptr, km_ptr, vs_ptr, vm_ptr, gidx_ptr, m_ptr, l_ptr, acc_ptr,
                       parts, n_tok, n_groups, chunk, rows, dim, scale, q_stride_h, gidx_stride,
                       BITS: tl.constexpr, PER: tl.constexpr, GROUP_TOKENS: tl.constexpr, CHANNELS: tl.constexpr,
                       HAS_GIDX: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    kv, split = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, BLOCK_R)  # the query heads sharing this kv head (one new token)
    row_in = r < rows
    d = tl.arange(0, BLOCK_D)
    d_in = d < dim
    q = tl.load(q_ptr + (kv * GROUP + r)[:, None] * q_stride_h + d[None, :], mask=row_in[:, None] & d_in[None, :],
                other=0.0).to(tl.float32) * (scale * 1.4426950408889634)
    row_bytes = dim // PER  # PER = 8 // BITS codes a byte
    byte = d // PER
    shift = ((d % PER) * BITS).to(tl.uint8)
    m = tl.full((BLOCK_R,), -1.0e30, dtype=tl.float32)
    l = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_tok)
    for start in range(lo, hi, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        s_in = s < hi
        sd_in = s_in[:, None] & d_in[None, :]
        token = kv * n_tok + s  # [kv_heads, N, ...] rows
        if HAS_GIDX:  # tokens moved by an eviction carry their group
            g = tl.load(gidx_ptr + kv * gidx_stride + s, mask=s_in, other=0).to(tl.int32)
        else:
            g = s // GROUP_TOKENS
        codes = (tl.load(kc_ptr + token[:, None] * row_bytes + byte[None, :], mask=sd_in, other=0) >> shift) \
            & ((1 << BITS) - 1)
        at = (kv * n_groups + g)[:, None] * dim + d[None, :]  # the group's per-channel scale and minimum
        keys = codes.to(tl.float32) * tl.load(ks_ptr + at, mask=sd_in, other=0.0).to(tl.float32) \
            + tl.load(km_ptr + at, mask=sd_in, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)
        scores = tl.where(s_in[None, :] & row_in[:, None], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        codes = (tl.load(vc_ptr + token[:, None] * row_bytes + byte[None, :], mask=sd_in, other=0) >> shift) \
            & ((1 << BITS) - 1)
        at = token[:, None] * (dim // CHANNELS) + (d // CHANNELS)[None, :]  # the token's per-channel-group params
        values = codes.to(tl.float32) * tl.load(vs_ptr + at, mask=sd_in, other=0.0).to(tl.float32) \
            + tl.load(vm_ptr + at, mask=sd_in, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * values[None, :, :], axis=1)
        m = m_new
    part = kv * parts + split
    tl.store(m_ptr + part * BLOCK_R + r, m)
    tl.store(l_ptr + part * BLOCK_R + r, l)
    tl.store(acc_ptr + (part * BLOCK_R + r[:, None]) * BLOCK_D + d[None, :], acc)


def kivi_attention(q: torch.Tensor, tok: dict[str, torch.Tensor], grp: dict[str, torch.Tensor],
                   gidx: torch.Tensor | None, bits: int, group: int, channels: int, raw_k: torch.Tensor,
                   raw_v: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """One decoding step's q [1, heads, dim] over N compressed tokens (KiviCodec's `tok` and `grp` fields,
    every kv head coded; `gidx` [1 or kv_heads, N] or None) followed by the raw window raw_k, raw_v
    [kv_heads, R, dim] (the new token's key last), every key visible. Returns [1, heads * dim]."""
    if q.shape[0] != 1:
        raise ValueError(f"KIVI attention takes one decoding step's query, got {q.shape[0]} rows")
    kv_heads, n_tok = tok["k"].shape[0], tok["k"].shape[1]
    if kv_heads != raw_k.shape[0]:
        raise ValueError(f"the codes cover {kv_heads} kv heads and the raw window {raw_k.shape[0]}: "
                         "heads kept raw (raw_heads) are not supported by this kernel")
    chunk = chunk or chunk_size(n_tok + raw_k.shape[1], kv_heads)
    coded_parts = triton.cdiv(n_tok, chunk)
    partials = Partials(q, kv_heads, coded_parts + triton.cdiv(raw_k.shape[1], chunk))
    dim = q.shape[2]
    if n_tok:
        n_groups = grp["k_scale"].shape[1]
        _kivi_chunk_kernel[(kv_heads, coded_parts)](
            q, tok["k"], tok["v"], grp["k_scale"], grp["k_min"], tok["v_scale"], tok["v_min"],
            gidx if gidx is not None else tok["k"], partials.m, partials.l, partials.acc, partials.parts, n_tok,
            n_groups, chunk, partials.rows, dim, dim ** -0.5, q.stride(1),
            0 if gidx is None or gidx.shape[0] == 1 else gidx.stride(0),
            BITS=bits, PER=8 // bits, GROUP_TOKENS=group, CHANNELS=channels, HAS_GIDX=gidx is not None,
            GROUP=partials.group, BLOCK_R=partials.block_r, BLOCK_D=partials.block_d, BLOCK_S=BLOCK_S)
    partials.dense(raw_k, raw_v, coded_parts, chunk, None, raw_k.shape[1] - 1)
    return partials.merge()


def kivi_layer_attention(q: torch.Tensor, layer) -> torch.Tensor:
    """`kivi_attention` over a KIVI `CompressedLayerCache` as it stands after the step's token was appended."""
    codec = layer.codec
    raw_k, raw_v = layer.raw.view()
    if layer.n_full:
        raise ValueError("this kernel reads coded heads only; the layer keeps some heads raw (raw_heads)")
    if not layer.n_compressed:
        return attention(q, raw_k, raw_v)
    return kivi_attention(q, layer.tok, layer.grp, layer.gidx, codec.bits, codec.group, codec.channels, raw_k, raw_v)
