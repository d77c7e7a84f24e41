"""Triton weight-only int8 and int4 products for one token or a small batch, the dequantization fused in.

Memory-bound: a decoding step reads each weight byte once, so these kernels stream the codes and apply the
scales in registers rather than materialising a dequantized weight (what the reference does off the CPU).
One program computes a block of output features for one activation row over one slice of the inputs (split-K:
a 4096-row weight has only 64 blocks of rows, too few programs to fill a GPU's 132 processors and keep its
memory busy, so the inputs are cut into slices until there are about four programs per processor; the slices'
float32 partial sums are added afterwards). A batch of M rows re-reads the codes M times from L2, which suits the
M <= 16 of decoding and draft verification (larger M: use a dense product).

Layouts (`backend_triton.pack_int8`, `pack_int4`), the ones `workbench/compression/` stores:
- int8: codes int8 [N, K] row-major, one scale per output row [N] (weight = code * scale).
- int4: torch's tiled CPU int4 layout (`backend_torch.pack_int4`): tiles of 64 output rows, uint8
  [N/64, K, 32] where byte (t, k, j) holds row t*64+j in its low nibble and row t*64+32+j in its high one;
  `scale_zeros` [K/group, N, 2] with weight = (code - 8) * scale + zero. Int4Linear reads that layout back
  (codes, rows), so the GPU keeps it rather than adding a fourth.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_kernel(x_ptr, codes_ptr, scales_ptr, bias_ptr, out_ptr, n, k, k_chunk, x_stride, n_rows,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split, m = tl.program_id(1), tl.program_id(2)
    row_in = rows < n
    lo = split * k_chunk
    hi = tl.minimum(lo + k_chunk, k)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_in = cols < hi
        x = tl.load(x_ptr + m * x_stride + cols, mask=col_in, other=0.0).to(tl.float32)
        codes = tl.load(codes_ptr + rows[:, None] * k + cols[None, :], mask=row_in[:, None] & col_in[None, :],
                        other=0).to(tl.float32)
        acc += tl.sum(codes * x[None, :], axis=1)
    acc *= tl.load(scales_ptr + rows, mask=row_in, other=0.0).to(tl.float32)
    if HAS_BIAS:  # once: in the first slice's partial sum
        acc += tl.load(bias_ptr + rows, mask=row_in & (rows * 0 + split == 0), other=0.0).to(tl.float32)
    tl.store(out_ptr + (split * n_rows + m) * n + rows, acc.to(out_ptr.dtype.element_ty), mask=row_in)


@functools.cache
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors (1 in the interpreter, where there is no parallelism to find)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def split_k(programs: int, k: int, block_k: int, device: torch.device, splits: int | None = None
            ) -> tuple[int, int]:
    """(slices, inputs per slice, a multiple of block_k): enough slices for about four programs per processor,
    each slice at least four blocks of inputs; `splits` asks for a count instead (the tests' way to cover it)."""
    if splits is None:
        splits = max(1, min(4 * _processors(device) // programs, k // (4 * block_k)))
    chunk = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return triton.cdiv(k, chunk), chunk


def _launch(kernel, grid_blocks: int, rows: torch.Tensor, n: int, k: int, block_k: int, splits: int | None,
            tensors: tuple, scalars: tuple, **constants) -> torch.Tensor:
    """Runs `kernel` over (row blocks, slices, activation rows) into [M, n] in the activations' dtype: directly
    with one slice, else through float32 partial sums [slices, M, n]."""
    m = rows.shape[0]
    slices, chunk = split_k(grid_blocks * m, k, block_k, rows.device, splits)
    out = torch.empty((m, n), dtype=rows.dtype, device=rows.device)
    target = out if slices == 1 else torch.empty((slices, m, n), dtype=torch.float32, device=rows.device)
    kernel[(grid_blocks, slices, m)](rows, *tensors, target, n, k, *scalars, chunk, rows.stride(0), m, **constants)
    if slices > 1:
        out.copy_(target.sum(0))
    return out


def linear_int8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                splits: int | None = None) -> torch.Tensor:
    n, k = codes.shape
    rows = x.reshape(-1, k)
    block_n, block_k = 64, 128
    if splits is None and triton.cdiv(k, block_k) <= 64:
        # measured on the H200 (docs/kernels.md): at K = 4096 slicing halved int8's speed (the partial sums' two
        # extra launches outweigh the parallelism), at K = 14336 it nearly doubled it; int4 gained at every K
        splits = 1
    out = _launch(_int8_kernel, triton.cdiv(n, block_n), rows, n, k, block_k, splits,
                  (codes, scales, scales if bias is None else bias), (),
                  HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.view(*x.shape[:-1], n)


TILE = 64  # rows per tile of the int4 layout; a program computes one tile (its two halves of 32 rows)
SUB = 32  # inputs per sub-block: groups are multiples of 32, so a sub-block has one scale and zero per row


@triton.jit
def _int4_kernel(x_ptr, packed_ptr, sz_ptr, bias_ptr, out_ptr, n, k, group, k_chunk, x_stride, n_rows,
                 HAS_BIAS: tl.constexpr, SUBS: tl.constexpr):
    tile, split, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    j = tl.arange(0, 32)
    low_rows, high_rows = tile * 64 + j, tile * 64 + 32 + j
    lo = split * k_chunk
    hi = tl.minimum(lo + k_chunk, k)
    acc_low = tl.zeros((32,), dtype=tl.float32)
    acc_high = tl.zeros((32,), dtype=tl.float32)
    for start in range(lo, hi, SUBS * 32):
        for s in tl.static_range(SUBS):  # unrolled: SUBS independent loads in flight, not one at a time
            first = start + s * 32
            inside = j * 0 + first < hi  # masks as vectors: the interpreter takes no scalar comparison
            cols = first + tl.arange(0, 32)
            x = tl.load(x_ptr + m * x_stride + cols, mask=cols < hi, other=0.0).to(tl.float32)
            bytes_ = tl.load(packed_ptr + tile * k * 32 + cols[:, None] * 32 + j[None, :], mask=(cols < hi)[:, None],
                             other=0).to(tl.int32)  # [32 inputs, 32 rows]
            low = (bytes_ & 15).to(tl.float32) - 8.0
            high = (bytes_ >> 4).to(tl.float32) - 8.0
            params = sz_ptr + (first // group) * n * 2
            x_sum = tl.sum(x, axis=0)
            acc_low += tl.load(params + low_rows * 2, mask=inside, other=0.0).to(tl.float32) \
                * tl.sum(low * x[:, None], axis=0) \
                + tl.load(params + low_rows * 2 + 1, mask=inside, other=0.0).to(tl.float32) * x_sum
            acc_high += tl.load(params + high_rows * 2, mask=inside, other=0.0).to(tl.float32) \
                * tl.sum(high * x[:, None], axis=0) \
                + tl.load(params + high_rows * 2 + 1, mask=inside, other=0.0).to(tl.float32) * x_sum
    if HAS_BIAS:  # once: in the first slice's partial sum
        first_slice = j * 0 + split == 0
        acc_low += tl.load(bias_ptr + low_rows, mask=first_slice, other=0.0).to(tl.float32)
        acc_high += tl.load(bias_ptr + high_rows, mask=first_slice, other=0.0).to(tl.float32)
    out = out_ptr + (split * n_rows + m) * n
    tl.store(out + low_rows, acc_low.to(out_ptr.dtype.element_ty))
    tl.store(out + high_rows, acc_high.to(out_ptr.dtype.element_ty))


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int,
                bias: torch.Tensor | None, splits: int | None = None) -> torch.Tensor:
    n = scale_zeros.shape[1]
    k = packed.numel() * 2 // n
    rows = x.reshape(-1, k)
    subs = 4
    out = _launch(_int4_kernel, n // TILE, rows, n, k, subs * SUB, splits,
                  (packed, scale_zeros, scale_zeros if bias is None else bias), (group,),
                  HAS_BIAS=bias is not None, SUBS=subs)
    return out.view(*x.shape[:-1], n)
