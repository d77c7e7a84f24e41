"""DFloat11's exponent decoder as Triton kernels: Huffman-coded exponents back into bf16 weights on the GPU.

Paper: "70% Size, 100% Accuracy: Lossless LLM Compression for Efficient GPU Inference via Dynamic-Length
Float" (DFloat11), Zhang et al., arXiv 2504.11651, section 3.3 (the GPU decoder).

The layout is the one `workbench/compression/dfloat11.py` stores and the C decoder (`cpu_dfloat11.c`) reads: the
exponents' canonical Huffman codes (at most 12 bits) packed most significant bit first into int32 words with one
padding word, cut into blocks of `block` exponents whose starting bit offsets are stored (the paper's gap array;
a block's output position is its index times `block`, so no second array is needed), and the sign+mantissa bytes.

Two launches. `_lut_kernel` expands the canonical code table (`first`: each code left-justified to 12 bits,
`entry`: symbol | length << 8) into the 4096-entry lookup table (every 12-bit window -> the code it starts with),
8 KB that stays in L1/L2. `_decode_kernel` is block-parallel as in the paper: every lane of a program decodes one
block from its stored bit offset, a table lookup per exponent (a 64-bit window of two words, shifted to the
code), and writes 16 assembled bf16 weights per lane at a time (a [lanes, 16] tile) so stores are contiguous.
Left out: the paper's two-level tables in shared memory (Triton has no explicit shared memory; the table is read
through the caches) and decoding a whole transformer block's weights in one launch (here: one weight per call).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CODE_BITS = 12  # workbench.compression.dfloat11.MAX_CODE_BITS (that module imports this one's package)
LUT_SIZE = 1 << CODE_BITS
LANES = 64  # blocks per program
TILE = 16  # exponents per lane between stores


@triton.jit
def _lut_kernel(first_ptr, entry_ptr, lut_ptr, n_codes, BLOCK: tl.constexpr):
    windows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    index = tl.zeros([BLOCK], dtype=tl.int32) - 1
    for c in range(n_codes):  # canonical order: a window starts with the last code whose left-justified value <= it
        index += (tl.load(first_ptr + c) <= windows).to(tl.int32)
    tl.store(lut_ptr + windows, tl.load(entry_ptr + index))


@triton.jit
def _decode_kernel(words_ptr, offsets_ptr, lut_ptr, sm_ptr, out_ptr, n_blocks, block, n_words,
                   CODE_BITS: tl.constexpr, LANES: tl.constexpr, TILE: tl.constexpr):
    blocks = tl.program_id(0) * LANES + tl.arange(0, LANES)
    live = blocks < n_blocks
    pos = tl.load(offsets_ptr + blocks, mask=live, other=0).to(tl.int64) & 0xFFFFFFFF  # int32 held, unsigned
    cols = tl.arange(0, TILE)
    lanes0 = tl.zeros([LANES], dtype=tl.int32)  # a scalar condition as a lane vector (masks are per lane)
    for start in range(0, block, TILE):
        exponents = tl.zeros([LANES, TILE], dtype=tl.int32)
        for j in tl.static_range(TILE):
            inside = live & (lanes0 + (start + j) < block)
            w = pos >> 5
            hi = tl.load(words_ptr + w, mask=inside & (w < n_words), other=0).to(tl.int64) & 0xFFFFFFFF
            lo = tl.load(words_ptr + w + 1, mask=inside & (w + 1 < n_words), other=0).to(tl.int64) & 0xFFFFFFFF
            window = (((hi << 32) | lo) >> (64 - CODE_BITS - (pos & 31))) & ((1 << CODE_BITS) - 1)
            entry = tl.load(lut_ptr + window, mask=inside, other=0).to(tl.int32) & 0xFFFF
            pos += tl.where(inside, entry >> 8, 0)
            exponents = tl.where(cols[None, :] == j, (entry & 0xFF)[:, None], exponents)
        at = blocks[:, None].to(tl.int64) * block + start + cols[None, :]
        keep = live[:, None] & (start + cols[None, :] < block)
        sm = tl.load(sm_ptr + at, mask=keep, other=0).to(tl.int32) & 0xFF
        bits = ((sm & 0x80) << 8) | (exponents << 7) | (sm & 0x7F)
        tl.store(out_ptr + at, bits.to(tl.int16), mask=keep)


def lookup_table(first: torch.Tensor, entry: torch.Tensor) -> torch.Tensor:
    """int16 [4096]: for every 12-bit window, the entry (symbol | length << 8) of the code it starts with."""
    first, entry = first.to(torch.int32).contiguous(), entry.to(torch.int16).contiguous()
    lut = torch.empty(LUT_SIZE, dtype=torch.int16, device=first.device)
    _lut_kernel[(LUT_SIZE // 1024,)](first, entry, lut, first.numel(), BLOCK=1024)
    return lut


def decode_bf16(words: torch.Tensor, offsets: torch.Tensor, first: torch.Tensor, entry: torch.Tensor, block: int,
                sign_mantissa: torch.Tensor) -> torch.Tensor:
    """`cpu_dfloat11.decode_bf16`'s contract on the tensors' device: bf16 [len(offsets) * block], the exponents of
    each block decoded from its bit offset in `words` and joined with `sign_mantissa` uint8."""
    if words.dtype != torch.int32 or offsets.dtype != torch.int32:
        raise ValueError("words and offsets must be int32 tensors (DFloat11Linear's buffers)")
    if sign_mantissa.numel() != offsets.numel() * block:
        raise ValueError(f"{sign_mantissa.numel()} sign+mantissa bytes for {offsets.numel()} blocks of {block}")
    words, offsets, sign_mantissa = words.contiguous(), offsets.contiguous(), sign_mantissa.contiguous()
    lut = lookup_table(first, entry)
    n_blocks = offsets.numel()
    out = torch.empty(n_blocks * block, dtype=torch.int16, device=words.device)
    if n_blocks:
        _decode_kernel[(triton.cdiv(n_blocks, LANES),)](words, offsets, lut, sign_mantissa, out, n_blocks, block,
                                                        words.numel(), CODE_BITS=CODE_BITS, LANES=LANES, TILE=TILE)
    return out.view(torch.bfloat16)
