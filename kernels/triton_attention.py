"""Triton decode and tree attention over a dense cache view: split-key ("flash-decoding") online softmax.

One kernel serves both operations. A program takes one kv head and one chunk of its keys, and every query row
that reads that head: the `group` query heads sharing it times the T new tokens (T = 1 for a decoding step, a
draft tree's nodes for verification), so each key and value byte is read once per step. Within the chunk it
walks blocks of keys with the online softmax [Milakov & Gimelshein, arXiv 1805.02867; FlashAttention,
arXiv 2205.14135] and writes the chunk's running max, sum and weighted values; a second small kernel merges the
chunks (Flash-Decoding's split-K: short query, long cache, so parallelism comes from splitting the keys).

The mask: key s is visible to new token t when s < n_past (every cached key) or, among the new keys, where
new_mask[t, s - n_past] (None: causal) -- the tree mask, applied in the same kernel.
Inputs: q [T, heads, dim]; k, v [kv_heads, S, dim] with a unit last stride (a cache's buffer views); out
[T, heads * dim] in q's dtype. Not here: quantized or sparse caches (those dequantize first in the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_S = 32  # keys per inner block
LOG2E = 1.4426950408889634


@triton.jit
def _chunk_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr, part_base, parts,
                  n_new, n_past, s_total, chunk, rows, dim, scale,
                  q_stride_t, q_stride_h, k_stride_h, k_stride_s, v_stride_h, v_stride_s,
                  GROUP: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, USE_DOT: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    kv, split = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, BLOCK_R)  # row r: query head kv * GROUP + r // n_new, new token r % n_new
    t = r % n_new
    row_in = r < rows
    d = tl.arange(0, BLOCK_D)
    d_in = d < dim
    q = tl.load(q_ptr + t[:, None] * q_stride_t + (kv * GROUP + r // n_new)[:, None] * q_stride_h + d[None, :],
                mask=row_in[:, None] & d_in[None, :], other=0.0).to(tl.float32) * (scale * 1.4426950408889634)
    m = tl.full((BLOCK_R,), -1.0e30, dtype=tl.float32)  # finite: a chunk a row cannot see leaves exp(...) = 0
    l = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, s_total)
    for start in range(lo, hi, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        s_in = s < hi
        kd_in = s_in[:, None] & d_in[None, :]
        keys = tl.load(k_ptr + kv * k_stride_h + s[:, None] * k_stride_s + d[None, :], mask=kd_in, other=0.0)
        values = tl.load(v_ptr + kv * v_stride_h + s[:, None] * v_stride_s + d[None, :], mask=kd_in, other=0.0)
        if USE_DOT:  # float32 operands (the interpreter has no bf16 products), IEEE products: float32 means float32
            # (tl.dot would round them to TF32 on tensor cores, 1e-3 apart); this work is memory-bound anyway
            scores = tl.dot(q, tl.trans(keys.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.sum(q[:, None, :] * keys.to(tl.float32)[None, :, :], axis=2)
        visible = s_in[None, :] & row_in[:, None]
        new = s - n_past  # index among the new keys (negative: a cached key, always visible)
        if MASK:
            allowed = tl.load(mask_ptr + t[:, None] * n_new + new[None, :],
                              mask=(new[None, :] >= 0) & visible, other=1)
            visible = visible & (allowed != 0)
        if CAUSAL:
            visible = visible & (new[None, :] <= t[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, values.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * values.to(tl.float32)[None, :, :], axis=1)
        m = m_new
    part = kv * parts + part_base + split  # its slot among all the partial results merged together
    tl.store(m_ptr + part * BLOCK_R + r, m)
    tl.store(l_ptr + part * BLOCK_R + r, l)
    tl.store(acc_ptr + (part * BLOCK_R + r[:, None]) * BLOCK_D + d[None, :], acc)


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, n_new, heads, dim, splits,
                  GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    kv, r = tl.program_id(0), tl.program_id(1)
    p = tl.arange(0, BLOCK_P)
    p_in = p < splits
    d = tl.arange(0, BLOCK_D)
    at = (kv * splits + p) * BLOCK_R + r
    m = tl.load(m_ptr + at, mask=p_in, other=-1.0e30)
    weight = tl.exp2(m - tl.max(m, axis=0))
    total = tl.sum(tl.load(l_ptr + at, mask=p_in, other=0.0) * weight, axis=0)
    acc = tl.load(acc_ptr + at[:, None] * BLOCK_D + d[None, :], mask=p_in[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / total
    head, t = kv * GROUP + r // n_new, r % n_new
    tl.store(out_ptr + (t * heads + head) * dim + d, out.to(out_ptr.dtype.element_ty), mask=d < dim)


def chunk_size(keys: int, kv_heads: int) -> int:
    """Keys per program: enough programs to fill a GPU (about 128) without chunks shorter than 256 keys."""
    splits = max(1, min(triton.cdiv(keys, 256), 128 // kv_heads))
    return triton.cdiv(triton.cdiv(keys, splits), BLOCK_S) * BLOCK_S


class Partials:
    """The per-chunk running max, sum and weighted values that `merge` combines: [kv_heads, parts, rows(, dim)]
    float32, rows and dim padded to powers of two. Kernels over other cache forms (triton_kivi.py) write their
    chunks into the same buffers, so one merge spans a compressed region and a raw window."""

    def __init__(self, q: torch.Tensor, kv_heads: int, parts: int):
        n_new, heads, dim = q.shape
        self.q, self.kv_heads, self.parts, self.group = q, kv_heads, parts, heads // kv_heads
        self.rows = self.group * n_new
        self.block_r, self.block_d = max(triton.next_power_of_2(self.rows), 2), triton.next_power_of_2(dim)
        self.m = torch.empty((kv_heads, parts, self.block_r), dtype=torch.float32, device=q.device)
        self.l = torch.empty_like(self.m)
        self.acc = torch.empty((kv_heads, parts, self.block_r, self.block_d), dtype=torch.float32, device=q.device)

    def dense(self, k: torch.Tensor, v: torch.Tensor, part_base: int, chunk: int, new_mask: torch.Tensor | None,
              n_past: int) -> None:
        """Chunks of `chunk` keys of k, v [kv_heads, S, dim] into parts part_base.. (keys past n_past: the new
        tokens', under new_mask or causal)."""
        q, n_new, dim = self.q, self.q.shape[0], self.q.shape[2]
        mask = new_mask.to(torch.int8).contiguous() if new_mask is not None else self.m  # unused when None
        _chunk_kernel[(self.kv_heads, triton.cdiv(k.shape[1], chunk))](
            q, k, v, mask, self.m, self.l, self.acc, part_base, self.parts, n_new, n_past, k.shape[1], chunk,
            self.rows, dim, dim ** -0.5, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), GROUP=self.group, MASK=new_mask is not None, CAUSAL=new_mask is None and n_new > 1,
            USE_DOT=self.block_r >= 16 and self.block_d >= 16, BLOCK_R=self.block_r, BLOCK_D=self.block_d,
            BLOCK_S=BLOCK_S)

    def merge(self) -> torch.Tensor:
        """Every part combined: [T, heads * dim] in q's dtype."""
        n_new, heads, dim = self.q.shape
        out = torch.empty((n_new, heads * dim), dtype=self.q.dtype, device=self.q.device)
        _merge_kernel[(self.kv_heads, self.rows)](
            self.m, self.l, self.acc, out, n_new, heads, dim, self.parts, GROUP=self.group, BLOCK_R=self.block_r,
            BLOCK_D=self.block_d, BLOCK_P=max(triton.next_power_of_2(self.parts), 2))
        return out


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, new_mask: torch.Tensor | None,
                   n_past: int, chunk: int | None = None) -> torch.Tensor:
    """q [T, heads, dim] over k, v [kv_heads, S, dim] (S = n_past + T), new_mask [T, T] bool (None: causal).
    `chunk` (keys per program, a multiple of BLOCK_S) defaults to `chunk_size`."""
    chunk = chunk or chunk_size(k.shape[1], k.shape[0])
    partials = Partials(q, k.shape[0], triton.cdiv(k.shape[1], chunk))
    partials.dense(k, v, 0, chunk, new_mask, n_past)
    return partials.merge()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """One decoding step: q [1, heads, dim], every key visible. Returns [1, heads * dim]."""
    return tree_attention(q, k, v, None, k.shape[1] - q.shape[0], chunk)
