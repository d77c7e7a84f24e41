"""Low-bit element formats, bit packing, and the linear layer that holds scaled codes (shared by fp4 and mx).

An element format is a set of representable magnitudes plus a sign bit (minifloats: FP4 E2M1 / E1M2 / E3M0,
FP6 E2M3 / E3M2, FP8 E4M3 / E5M2) or a two's-complement integer (MX's INT8). A code's bit pattern is the
format's own encoding, so packed bytes are the real format: for a minifloat the magnitude bits are
`exponent << mantissa_bits | mantissa`, which is also the magnitude's rank among the representable values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.compression.base import CompressedLinear


@dataclass(frozen=True)
class ElementFormat:
    """A sign-magnitude minifloat (exp_bits, man_bits, IEEE-style bias 2^(e-1) - 1, subnormals) or, with
    exp_bits == 0 and integer=True, a two's-complement integer of man_bits + 1 bits scaled by 2^-scale_shift."""

    name: str
    exp_bits: int
    man_bits: int
    # Codes of the largest magnitudes reserved for Inf/NaN (OCP E4M3 keeps only S.1111.111 for NaN: 1;
    # E5M2 keeps the whole top exponent: 4); they are never produced.
    reserved: int = 0
    integer: bool = False
    scale_shift: int = 0

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    def magnitudes(self) -> torch.Tensor:
        """Representable magnitudes in code order (ascending), float32 [2^(bits-1) - reserved]."""
        if self.integer:
            return torch.arange(2 ** self.man_bits, dtype=torch.float32) / 2 ** self.scale_shift
        bias = 2 ** (self.exp_bits - 1) - 1 if self.exp_bits else 0
        values = []
        for code in range(2 ** (self.exp_bits + self.man_bits) - self.reserved):
            exp, man = code >> self.man_bits, code & (2 ** self.man_bits - 1)
            if exp == 0:  # subnormal: 0.m * 2^(1 - bias)
                values.append(man / 2 ** self.man_bits * 2.0 ** (1 - bias))
            else:
                values.append((1 + man / 2 ** self.man_bits) * 2.0 ** (exp - bias))
        return torch.tensor(values, dtype=torch.float32)

    @property
    def max_value(self) -> float:
        return float(self.magnitudes()[-1])

    @property
    def emax(self) -> int:
        """Exponent of the largest normal value (the OCP MX spec's emax_elem)."""
        return math.floor(math.log2(self.max_value))

    def table(self) -> torch.Tensor:
        """Value of every code, float32 [2^bits] (reserved codes map to 0: they never occur)."""
        n = 2 ** (self.bits - 1)
        mags = torch.zeros(n)
        mags[: len(self.magnitudes())] = self.magnitudes()
        if self.integer:  # two's complement: codes n.. are -n..-1 in steps of the integer's unit
            return torch.cat((mags, (torch.arange(n, dtype=torch.float32) - n) / 2 ** self.scale_shift))
        return torch.cat((mags, -mags))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Round x (already divided by its scale) to the nearest value, saturating; uint8 codes, same shape."""
        if self.integer:
            q = torch.round(x * 2 ** self.scale_shift).clamp(-(2 ** self.man_bits), 2 ** self.man_bits - 1)
            return q.to(torch.int16).remainder(2 ** self.bits).to(torch.uint8)
        mags = self.magnitudes().to(x.device)
        mid = (mags[1:] + mags[:-1]) / 2
        index = torch.bucketize(x.abs().float(), mid)  # nearest magnitude; beyond the largest saturates
        sign = (x < 0).to(torch.uint8) << (self.bits - 1)
        return index.to(torch.uint8) | sign


FORMATS = {f.name: f for f in (
    ElementFormat("e2m1", 2, 1),
    ElementFormat("e1m2", 1, 2),
    ElementFormat("e3m0", 3, 0),
    ElementFormat("e2m3", 2, 3),
    ElementFormat("e3m2", 3, 2),
    ElementFormat("e4m3", 4, 3, reserved=1),
    ElementFormat("e5m2", 5, 2, reserved=4),
    ElementFormat("int8", 0, 7, integer=True, scale_shift=6),
)}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [rows, n] of `bits` bits densely along each row, little-endian:
    uint8 [rows, ceil(n * bits / 8)] (each row zero-padded to whole bytes, so rows decode on their own)."""
    per_word = 8 // math.gcd(bits, 8)  # codes that fill a whole number of bytes (4 bits: 2, 6 bits: 4)
    rows = F.pad(codes, (0, -codes.shape[1] % per_word))
    groups = rows.reshape(rows.shape[0], -1, per_word).to(torch.int64)
    word = (groups << (bits * torch.arange(per_word, device=codes.device))).sum(-1)
    n_bytes = per_word * bits // 8
    out = (word[..., None] >> (8 * torch.arange(n_bytes, device=codes.device))) & 0xFF
    return out.to(torch.uint8).reshape(rows.shape[0], -1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 codes [rows, n]."""
    per_word = 8 // math.gcd(bits, 8)
    n_bytes = per_word * bits // 8
    groups = packed.reshape(packed.shape[0], -1, n_bytes).to(torch.int64)
    word = (groups << (8 * torch.arange(n_bytes, device=packed.device))).sum(-1)
    codes = (word[..., None] >> (bits * torch.arange(per_word, device=packed.device))) & (2 ** bits - 1)
    return codes.to(torch.uint8).reshape(packed.shape[0], -1)[:, :n]


class ScaledCodeLinear(CompressedLinear):
    """Weight = table[code] * scale, one scale per `group` consecutive inputs of a row. Codes are packed
    (`bits` each) row by row; scales are float16, or E8M0 bytes (2^(byte - 127), MX's shared scale) when
    `e8m0`. No kernel multiplies these formats here: forward dequantizes and runs a dense matmul (simulated
    speed). `rows` decodes single rows, for an embedding tied to this layer."""

    simulated = True

    def __init__(self, codes: torch.Tensor, fmt: ElementFormat, scales: torch.Tensor, group: int,
                 bias: torch.Tensor | None, dtype: torch.dtype, e8m0: bool = False):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.fmt, self.group, self.e8m0, self.dtype = fmt, group, e8m0, dtype
        self.register_buffer("packed", pack_codes(codes, fmt.bits))  # [out, in * bits / 8]
        self.register_buffer("scales", scales)  # [out, in // group]
        self.register_buffer("table", fmt.table().to(codes.device))  # [2^bits] value of each code
        self.bias = bias

    def _weight(self, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        codes = unpack_codes(packed, self.fmt.bits, self.in_features).view(len(packed), -1, self.group)
        scales = torch.exp2(scales.float() - 127) if self.e8m0 else scales.float()
        return (self.table[codes.long()] * scales[..., None]).view(len(packed), self.in_features).to(self.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self._weight(self.packed, self.scales)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._weight(self.packed[ids], self.scales[ids])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.table))
