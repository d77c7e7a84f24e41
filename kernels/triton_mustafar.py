"""Triton decode attention over Mustafar's bitmap-sparse KV cache, reading the bitmap format directly.

Mustafar [arXiv 2505.22913] prunes each cached token's key and value to its largest-magnitude channels and
stores a bitmap (one bit per channel) and the kept values packed in channel order (layout:
`workbench.cache.mustafar.MustafarCodec`: `k_bitmap`, `v_bitmap` uint8 [kv_heads, N, dim / 8], channel
8j + i in bit i of byte j; `k_values`, `v_values` [kv_heads, N, kept] in the model's dtype). Its kernel
decompresses a tile of tokens in registers and multiplies there (SpMV for q·K and P·V). Here each program
takes one kv head and a chunk of pruned tokens: it expands a block of bitmaps, finds each set channel's slot
among the packed values by a running count of the bits before it (`tl.cumsum`), gathers them, and runs the
online softmax; the dense window goes through the dense chunk kernel into the same partials
(`triton_attention.Partials`), merged once.

Left out: the paper's tiled bitmap format and its load balancing across warps; heads kept raw (`raw_heads`)
and tree verification over the pruned tokens (the reference `MustafarLayerCache.attend` runs those). The model
calls it through the `mustafar_attention` operation, which a Mustafar layer names as its `attention_operation`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workbench.kernels.triton_attention import BLOCK_S, Partials, attention, chunk_size


@triton.jit
def _expand(bitmap_ptr, values_ptr, token, s_in, d, d_in, dim, kept):
    """The dense [BLOCK_S, BLOCK_D] vectors of `token`s from their bitmaps and packed nonzeros (0 where pruned)."""
    sd_in = s_in[:, None] & d_in[None, :]
    bits = (tl.load(bitmap_ptr + token[:, None] * (dim // 8) + (d // 8)[None, :], mask=sd_in, other=0)
            >> (d % 8).to(tl.uint8)[None, :]) & 1
    bits = bits.to(tl.int32)
    slot = tl.cumsum(bits, axis=1) - bits  # set channels before this one: its place among the packed values
    present = sd_in & (bits != 0)
    return tl.load(values_ptr + token[:, None] * kept + slot, mask=present, other=0.0).to(tl.float32)


@triton.jit
def _mustafar_chunk_kernel(q_ptr, kb_ptr, kv_ptr, vb_ptr, vv_ptr, m_ptr, l_ptr, acc_ptr, parts, n_tok, kept,
                           chunk, rows, dim, scale, q_stride_h, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    kv, split = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, BLOCK_R)
    row_in = r < rows
    d = tl.arange(0, BLOCK_D)
    d_in = d < dim
    q = tl.load(q_ptr + (kv * GROUP + r)[:, None] * q_stride_h + d[None, :], mask=row_in[:, None] & d_in[None, :],
                other=0.0).to(tl.float32) * (scale * 1.4426950408889634)
    m = tl.full((BLOCK_R,), -1.0e30, dtype=tl.float32)
    l = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_tok)
    for start in range(lo, hi, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        s_in = s < hi
        token = kv * n_tok + s
        keys = _expand(kb_ptr, kv_ptr, token, s_in, d, d_in, dim, kept)
        scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)
        scores = tl.where(s_in[None, :] & row_in[:, None], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        values = _expand(vb_ptr, vv_ptr, token, s_in, d, d_in, dim, kept)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * values[None, :, :], axis=1)
        m = m_new
    part = kv * parts + split
    tl.store(m_ptr + part * BLOCK_R + r, m)
    tl.store(l_ptr + part * BLOCK_R + r, l)
    tl.store(acc_ptr + (part * BLOCK_R + r[:, None]) * BLOCK_D + d[None, :], acc)


def mustafar_attention(q: torch.Tensor, tok: dict[str, torch.Tensor], raw_k: torch.Tensor, raw_v: torch.Tensor,
                       chunk: int | None = None) -> torch.Tensor:
    """One decoding step's q [1, heads, dim] over N pruned tokens (MustafarCodec's `tok` fields, every kv head
    coded) followed by the dense window raw_k, raw_v [kv_heads, R, dim], every key visible. Returns
    [1, heads * dim]."""
    if q.shape[0] != 1:
        raise ValueError(f"Mustafar attention takes one decoding step's query, got {q.shape[0]} rows")
    kv_heads, n_tok, kept = tok["k_values"].shape
    if kv_heads != raw_k.shape[0]:
        raise ValueError(f"the pruned tokens cover {kv_heads} kv heads and the window {raw_k.shape[0]}: heads "
                         "kept raw (raw_heads) are not supported by this kernel")
    if tok["v_values"].shape[2] != kept or q.shape[2] % 8:
        raise ValueError("keys and values must keep the same number of channels, and head_dim be a multiple of 8")
    chunk = chunk or chunk_size(n_tok + raw_k.shape[1], kv_heads)
    coded_parts = triton.cdiv(n_tok, chunk)
    partials = Partials(q, kv_heads, coded_parts + triton.cdiv(raw_k.shape[1], chunk))
    dim = q.shape[2]
    _mustafar_chunk_kernel[(kv_heads, coded_parts)](
        q, tok["k_bitmap"], tok["k_values"], tok["v_bitmap"], tok["v_values"], partials.m, partials.l, partials.acc,
        partials.parts, n_tok, kept, chunk, partials.rows, dim, dim ** -0.5, q.stride(1), GROUP=partials.group,
        BLOCK_R=partials.block_r, BLOCK_D=partials.block_d, BLOCK_S=BLOCK_S)
    partials.dense(raw_k, raw_v, coded_parts, chunk, None, raw_k.shape[1] - 1)
    return partials.merge()


def mustafar_layer_attention(q: torch.Tensor, layer) -> torch.Tensor:
    """`mustafar_attention` over a `MustafarLayerCache` as it stands after the step's token was appended."""
    raw_k, raw_v = layer.raw.view()
    if layer.n_full:
        raise ValueError("this kernel reads pruned heads only; the layer keeps some heads raw (raw_heads)")
    if not layer.n_compressed:
        return attention(q, raw_k, raw_v)
    return mustafar_attention(q, layer.tok, raw_k, raw_v)
