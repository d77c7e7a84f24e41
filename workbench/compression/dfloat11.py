"""dfloat11: lossless bf16 weights at about 70% of their size, by Huffman-coding the exponents.

Paper: "70% Size, 100% Accuracy: Lossless LLM Compression for Efficient GPU Inference via Dynamic-Length
Float" (DFloat11), Zhang et al., arXiv 2504.11651.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from workbench.compression.base import CompressedLinear, CompressionContext, WeightTransform, dense_weight
from workbench.errors import SpecError
from workbench.kernels import cpu_dfloat11, dispatch
from workbench.models.packed_linear import packed_product
from workbench.registry import param, register

MAX_CODE_BITS = 12  # longest Huffman code: the decoder's lookup table has 2^12 entries
MAX_BLOCK = 256  # exponents per independently decodable block (a divisor of the row length, so rows decode alone)


def triton_decodes(device: torch.device) -> bool:
    """Whether the Triton DFloat11 decoder runs on `device` (CUDA compiled, or the CPU in Triton's interpreter)."""
    module = dispatch.backend("triton")
    return module is not None and module.available() and module.decodes_dfloat11(device)


def huffman_lengths(counts: torch.Tensor, max_bits: int = MAX_CODE_BITS) -> list[int]:
    """Code length per symbol (0 = unused) of a Huffman code for `counts` [256], limited to `max_bits`:
    over-long codes are cut to max_bits and the Kraft sum restored by lengthening the longest codes below it."""
    counts = [int(c) for c in counts.tolist()]
    used = [(c, s) for s, c in enumerate(counts) if c > 0]
    lengths = [0] * len(counts)
    if len(used) == 1:
        lengths[used[0][1]] = 1
        return lengths
    heap = [(c, i, [s]) for i, (c, s) in enumerate(used)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:  # merge the two rarest subtrees; every symbol in them gets one bit longer
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    lengths = [min(n, max_bits) for n in lengths]
    order = sorted((s for s in range(len(lengths)) if lengths[s]), key=lambda s: (-lengths[s], counts[s]))
    while sum(2.0 ** -n for n in lengths if n) > 1:
        s = next(s for s in order if lengths[s] < max_bits)  # the longest code that may still grow
        lengths[s] += 1
    return lengths


def canonical_codes(lengths: list[int]) -> list[int]:
    """Canonical Huffman codes: by (length, symbol), each the previous plus one, shifted to its length."""
    codes, code, prev = [0] * len(lengths), 0, 0
    for s in sorted((s for s in range(len(lengths)) if lengths[s]), key=lambda s: (lengths[s], s)):
        code <<= lengths[s] - prev
        codes[s], prev = code, lengths[s]
        code += 1
    return codes


def encode(symbols: torch.Tensor, lengths: list[int], codes: list[int], block: int,
           chunk: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit-pack symbols [n] (uint8) with their codes, most significant bit first, into 32-bit words.
    Returns words int32 [w + 1] (one padding word, for the decoder's two-word window) and the bit offset
    int32 [n / block] where each block of `block` symbols starts."""
    length_of = torch.tensor(lengths, dtype=torch.int64)
    code_of = torch.tensor(codes, dtype=torch.int64)
    n_bits = torch.cumsum(length_of[symbols.long()], 0)
    total = int(n_bits[-1])
    words = torch.zeros(total // 32 + 2, dtype=torch.int64)
    starts = n_bits - length_of[symbols.long()]
    for i in range(0, len(symbols), chunk):  # chunks bound the temporaries for large matrices
        sym = symbols[i:i + chunk].long()
        n, c, p = length_of[sym], code_of[sym], starts[i:i + chunk]
        w, o = p >> 5, p & 31
        spill = (o + n - 32).clamp(min=0)  # bits that run into the next word
        words.index_add_(0, w, (c >> spill) << (32 - o - n + spill))
        words.index_add_(0, w + 1, (c & ((1 << spill) - 1)) << (32 - spill) & 0xFFFFFFFF)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words, starts[::block].to(torch.int32)


def decode(words: torch.Tensor, offsets: torch.Tensor, lut: torch.Tensor, block: int) -> torch.Tensor:
    """Exponents uint8 [len(offsets), block]: every block decoded in parallel, one symbol per step.
    lut [2^MAX_CODE_BITS] int64: symbol | code length << 8 for every MAX_CODE_BITS-bit window."""
    w = words.long() & 0xFFFFFFFF
    pairs = (w[:-1] << 32) | w[1:]  # any 32-bit-aligned two-word window: a code never spans more
    pos = offsets.long()
    out = torch.empty(block, len(pos), dtype=torch.uint8, device=words.device)
    shift, mask = 64 - MAX_CODE_BITS, (1 << MAX_CODE_BITS) - 1
    for step in range(block):
        entry = lut[(pairs[pos >> 5] >> (shift - (pos & 31))) & mask]
        out[step] = entry & 0xFF
        pos += entry >> 8
    return out.T


class DFloat11Linear(CompressedLinear):
    """A bf16 weight held as raw sign+mantissa bytes and Huffman-coded exponents, decoded before each use.

    Buffers: `sign_mantissa` uint8 [out * in], `words` int32 (the exponent bit stream), `offsets` int32
    (where each block of `block` exponents starts; blocks tile rows, so a row decodes on its own) and the
    canonical code table (`first`, `entry`). forward decodes the whole weight (bit-exact) and runs F.linear.
    The decode is a kernel where one runs (`decoder`): on CUDA the Triton kernels
    (`workbench.kernels.triton_dfloat11`: blocks in parallel over the GPU), on the CPU the C kernel
    (`workbench.kernels.cpu_dfloat11`: blocks in parallel over the cores); elsewhere, or without either,
    vectorised torch ops stand in for a decoding kernel, and the layer is marked simulated (its speed is not the
    format's). Which decoder ran is recorded as the run's `dfloat11_decode` kernel."""

    @property
    def simulated(self) -> bool:
        return self.decoder() == "torch"

    def decoder(self) -> str:
        """The decoder that runs for this layer's device: the first of the device's kernel backends
        (`dispatch.preference`, so WORKBENCH_KERNELS forces one) with a DFloat11 kernel here, else torch."""
        for name in dispatch.preference(self.words.device):
            if name == "triton" and triton_decodes(self.words.device):
                return name
            if name == "c" and self.words.is_cpu and cpu_dfloat11.available():
                return name
        return "torch"

    def _kernel_decode(self, offsets: torch.Tensor, sign_mantissa: torch.Tensor) -> torch.Tensor | None:
        """bf16 [len(offsets) * block] through the decoding kernel, or None where torch's decoder must run."""
        name = self.decoder()
        dispatch.note("dfloat11_decode", name)
        if name == "torch":
            return None
        decode = cpu_dfloat11.decode_bf16 if name == "c" else dispatch.backend("triton").decode_dfloat11
        return decode(self.words, offsets, self.first, self.entry, self.block, sign_mantissa)

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.block = max(b for b in range(1, MAX_BLOCK + 1) if self.in_features % b == 0)
        bits = w.detach().contiguous().view(torch.int16).flatten().cpu().int() & 0xFFFF
        exponent = ((bits >> 7) & 0xFF).to(torch.uint8)
        lengths = huffman_lengths(torch.bincount(exponent.int(), minlength=256))
        codes = canonical_codes(lengths)
        words, offsets = encode(exponent, lengths, codes, self.block)
        # The code table, in canonical order: each code left-justified to MAX_CODE_BITS, and symbol | length << 8.
        # The decoder expands it to a 2^MAX_CODE_BITS lookup table per decode (a few hundred bytes held, not 8 KB).
        order = sorted((s for s in range(256) if lengths[s]), key=lambda s: (lengths[s], s))
        first = torch.tensor([codes[s] << (MAX_CODE_BITS - lengths[s]) for s in order], dtype=torch.int32)
        entry = torch.tensor([s | lengths[s] << 8 for s in order], dtype=torch.int16)
        dev = w.device
        self.register_buffer("sign_mantissa", (((bits >> 8) & 0x80) | (bits & 0x7F)).to(torch.uint8).to(dev))
        self.register_buffer("words", words.to(dev))
        self.register_buffer("offsets", offsets.to(dev))
        self.register_buffer("first", first.to(dev))
        self.register_buffer("entry", entry.to(dev))
        self.bias = bias

    def lut(self) -> torch.Tensor:
        """[2^MAX_CODE_BITS] int64: for every window of the next bits, the code it starts with
        (symbol | length << 8)."""
        windows = torch.arange(1 << MAX_CODE_BITS, dtype=torch.int32, device=self.first.device)
        return self.entry.long()[torch.searchsorted(self.first, windows, right=True) - 1]

    def _bf16(self, exponent: torch.Tensor, sign_mantissa: torch.Tensor) -> torch.Tensor:
        sm = sign_mantissa.int()
        bits = ((sm & 0x80) << 8) | (exponent.int() << 7) | (sm & 0x7F)
        return torch.where(bits >= 2 ** 15, bits - 2 ** 16, bits).to(torch.int16).view(torch.bfloat16)

    def dequantized_weight(self) -> torch.Tensor:
        weight = self._kernel_decode(self.offsets, self.sign_mantissa)
        if weight is not None:
            return weight.view(self.out_features, self.in_features)
        exponent = decode(self.words, self.offsets, self.lut(), self.block)
        return self._bf16(exponent.reshape(self.out_features, self.in_features),
                          self.sign_mantissa.view(self.out_features, self.in_features))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        per_row = self.in_features // self.block
        blocks = (ids[:, None] * per_row + torch.arange(per_row, device=ids.device)).flatten()
        weight = self._kernel_decode(self.offsets[blocks], self.sign_mantissa.view(self.out_features, -1)[ids])
        if weight is not None:
            return weight.view(len(ids), self.in_features)
        exponent = decode(self.words, self.offsets[blocks], self.lut(), self.block)
        return self._bf16(exponent.reshape(len(ids), self.in_features),
                          self.sign_mantissa.view(self.out_features, self.in_features)[ids])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_product(x, self.dequantized_weight(), self.bias)  # bitwise the plain model's product

    def weight_nbytes(self) -> int:
        held = (self.sign_mantissa, self.words, self.offsets, self.first, self.entry)
        return sum(t.numel() * t.element_size() for t in held)


@register("compression", "dfloat11", lossless=True)
@dataclass
class DFloat11(WeightTransform):
    """DFloat11 (Zhang et al., "70% Size, 100% Accuracy: Lossless LLM Compression for Efficient GPU Inference
    via Dynamic-Length Float", arXiv 2504.11651): lossless bf16 weights at about 70% of their bytes.

    A bf16 weight's 8 exponent bits carry about 2.6 bits of information, so each layer's exponents are
    Huffman-coded (canonical code, at most 12 bits, one code per layer) while sign and mantissa stay raw
    bytes. Exponents are split into blocks with recorded bit offsets (the paper's gap array), so all blocks
    decode in parallel: a Triton kernel on CUDA, a C kernel on the CPU (blocks spread over the cores, each
    through a 4096-entry lookup table; `workbench.kernels.cpu_dfloat11`), or a vectorised torch decoder (one
    symbol per block per step) where neither runs. Each layer decodes its whole weight before every use and
    outputs are bit-for-bit those of the bf16 model. A tied embedding reads only the blocks of the rows it
    looks up. Every forward decodes every weight, so a step costs a decode of the model on top of the bf16
    product (docs/compression.md has the decoder's speed). The Triton kernel
    (`workbench.kernels.triton_dfloat11`) is block-parallel with a lookup table as in the paper's section 3.3;
    left out: its hierarchical lookup tables in shared memory and one launch decoding a whole transformer block.
    """

    stage = "encode"
    needs_dense = True

    head: bool = param(True, "also compress the LM head / tied embedding (lossless, so on by default)")

    def apply(self, model, ctx: CompressionContext) -> None:
        if ctx.dtype != torch.bfloat16:
            dtype = str(ctx.dtype).removeprefix("torch.")
            raise SpecError(f"dfloat11 encodes bfloat16 weights; this model runs in {dtype}; use dtype=bfloat16")
        for site in self.sites(model):
            self.replace(model, site, DFloat11Linear(dense_weight(site.module), site.module.bias))
