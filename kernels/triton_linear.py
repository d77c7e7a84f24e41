"""Triton weight-only int8 and int4 products for one token or a small batch, the dequantization fused in.

Memory-bound: a decoding step reads each weight byte once, so these kernels stream the codes and apply the
scales in registers rather than materialising a dequantized weight (what the reference does off the CPU).
One program computes a block of output features for one activation row; a batch of M rows re-reads the codes
M times from L2, which suits the M <= 16 of decoding and draft verification (larger M: use a dense product).

Layouts (`backend_triton.pack_int8`, `pack_int4`), the ones `workbench/compression/` stores:
- int8: codes int8 [N, K] row-major, one scale per output row [N] (weight = code * scale).
- int4: torch's tiled CPU int4 layout (`backend_torch.pack_int4`): tiles of 64 output rows, uint8
  [N/64, K, 32] where byte (t, k, j) holds row t*64+j in its low nibble and row t*64+32+j in its high one;
  `scale_zeros` [K/group, N, 2] with weight = (code - 8) * scale + zero. Int4Linear reads that layout back
  (codes, rows), so the GPU keeps it rather than adding a fourth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_kernel(x_ptr, codes_ptr, scales_ptr, bias_ptr, out_ptr, n, k, x_stride,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1)
    row_in = rows < n
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_in = cols < k
        x = tl.load(x_ptr + m * x_stride + cols, mask=col_in, other=0.0).to(tl.float32)
        codes = tl.load(codes_ptr + rows[:, None] * k + cols[None, :], mask=row_in[:, None] & col_in[None, :],
                        other=0).to(tl.float32)
        acc += tl.sum(codes * x[None, :], axis=1)
    acc *= tl.load(scales_ptr + rows, mask=row_in, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_in, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * n + rows, acc.to(out_ptr.dtype.element_ty), mask=row_in)


def linear_int8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    n, k = codes.shape
    rows = x.reshape(-1, k)
    out = torch.empty((rows.shape[0], n), dtype=x.dtype, device=x.device)
    block_n = 64
    _int8_kernel[(triton.cdiv(n, block_n), rows.shape[0])](
        rows, codes, scales, scales if bias is None else bias, out, n, k, rows.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=128)
    return out.view(*x.shape[:-1], n)


TILE = 64  # rows per tile of the int4 layout; a program computes one tile (its two halves of 32 rows)


@triton.jit
def _int4_kernel(x_ptr, packed_ptr, sz_ptr, bias_ptr, out_ptr, n, k, group, x_stride,
                 HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr):
    tile, m = tl.program_id(0), tl.program_id(1)
    j = tl.arange(0, 32)
    low_rows, high_rows = tile * 64 + j, tile * 64 + 32 + j
    acc_low = tl.zeros((32,), dtype=tl.float32)
    acc_high = tl.zeros((32,), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):  # BLOCK_K divides the group: one scale and zero per row per block
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * x_stride + cols).to(tl.float32)
        bytes_ = tl.load(packed_ptr + tile * k * 32 + cols[:, None] * 32 + j[None, :]).to(tl.int32)  # [BK, 32]
        low = (bytes_ & 15).to(tl.float32) - 8.0
        high = (bytes_ >> 4).to(tl.float32) - 8.0
        params = sz_ptr + (start // group) * n * 2
        x_sum = tl.sum(x, axis=0)
        acc_low += tl.load(params + low_rows * 2).to(tl.float32) * tl.sum(low * x[:, None], axis=0) \
            + tl.load(params + low_rows * 2 + 1).to(tl.float32) * x_sum
        acc_high += tl.load(params + high_rows * 2).to(tl.float32) * tl.sum(high * x[:, None], axis=0) \
            + tl.load(params + high_rows * 2 + 1).to(tl.float32) * x_sum
    if HAS_BIAS:
        acc_low += tl.load(bias_ptr + low_rows).to(tl.float32)
        acc_high += tl.load(bias_ptr + high_rows).to(tl.float32)
    tl.store(out_ptr + m * n + low_rows, acc_low.to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + m * n + high_rows, acc_high.to(out_ptr.dtype.element_ty))


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    n = scale_zeros.shape[1]
    k = packed.numel() * 2 // n
    rows = x.reshape(-1, k)
    out = torch.empty((rows.shape[0], n), dtype=x.dtype, device=x.device)
    _int4_kernel[(n // TILE, rows.shape[0])](
        rows, packed, scale_zeros, scale_zeros if bias is None else bias, out, n, k, group, rows.stride(0),
        HAS_BIAS=bias is not None, BLOCK_K=32)
    return out.view(*x.shape[:-1], n)
