"""int4: group-wise asymmetric weight-only quantization, round to nearest, on the workbench's int4 CPU kernel
(or torch's packed int4 kernel where that cannot run).

Paper: the group-wise asymmetric int4 format of GPTQ's and AWQ's kernels (Frantar et al., arXiv 2210.17323;
Lin et al., "AWQ", arXiv 2306.00978), here with round-to-nearest codes (the usual "RTN" baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.compression.base import (
    ACT_HELP,
    ACTIVATIONS,
    CompressedLinear,
    CompressionContext,
    WeightTransform,
    check_group,
    check_int8_activations,
    dense_weight,
)
from workbench.compression.formats import pack_codes, unpack_codes
from workbench.kernels import backend_torch, dispatch
from workbench.kernels import cpu as cpu_kernels
from workbench.registry import param, register

KERNEL_GROUPS = backend_torch.INT4_GROUPS  # what _weight_int4pack_mm_for_cpu accepts
_TILE = backend_torch.INT4_TILE  # torch's CPU int4 layout interleaves rows in tiles of 64 (j and j+32 share a byte)


def affine_params(w: torch.Tensor, maxq: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset over the last dim of w [..., g] (float32), so w ≈ scale * code + offset with codes in
    0..maxq: offset is the group's minimum, scale spans it to the maximum."""
    lo, hi = w.float().amin(-1), w.float().amax(-1)
    return (hi - lo).clamp(min=1e-8) / maxq, lo


def quantize_rtn_int4(w: torch.Tensor, group: int, param_dtype: torch.dtype = torch.float32, bits: int = 4,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric int4 (or `bits` 3, 2) of w [out, in]: codes uint8 [out, in] in
    0..2^bits - 1, scales and offsets float32 [out, in // group] (rounded to `param_dtype` first, so codes
    are nearest on the stored grid)."""
    out_f, in_f = w.shape
    maxq = 2 ** bits - 1
    wg = w.float().reshape(out_f, in_f // group, group)
    scale, offset = affine_params(wg, maxq)
    scale, offset = scale.to(param_dtype).float(), offset.to(param_dtype).float()
    codes = torch.clamp(torch.round((wg - offset[..., None]) / scale[..., None]), 0, maxq)
    return codes.to(torch.uint8).reshape(out_f, in_f), scale, offset


class Int4Linear(CompressedLinear):
    """Weight = scale * code + offset per group of `group` inputs, codes 0..15 packed two per byte.

    Held in one of three layouts, chosen when built (`dispatch.linear`: the C backend where it takes the shape,
    else the torch backend's):
    - bf16 on CPU where the C kernels run (`workbench.kernels.backend_c`): their int4 layout (`pack_int4`),
      a few rows of a draft tree for about the cost of one, each row's result the same whatever the row count;
      the one-call decoder layer takes it too (`kernel_weights`);
    - otherwise torch's CPU int4 kernel's (`packed` uint8 [out, in/2] tiled, `scale_zeros` [in/group, out, 2]
      in the compute dtype, weight = (code - 8) * scale + zero), run by `_weight_int4pack_mm_for_cpu` on the
      CPU and by Triton's fused-dequantization product on CUDA (`workbench.kernels.triton_linear`);
    - plain nibble pairs for shapes that kernel does not take.
    Elsewhere (or for shapes and groups no kernel takes) forward dequantizes and runs a dense matmul, marked
    `simulated`. `int8_activations`: the same layouts multiplied by int8 activations (`linear_int4_a8`)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int,
                 bias: torch.Tensor | None, dtype: torch.dtype, int8_activations: bool = False):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group, self.bias, self.int8_activations = group, bias, int8_activations
        self.product = dispatch.linear("int4_a8" if int8_activations else "int4", codes.device, dtype,
                                       self.out_features, self.in_features, group)
        self.own_kernel = self.product.name == "c"  # the C kernels' layout, which the one-call layers take
        self.tiled = not self.own_kernel and self.out_features % _TILE == 0
        self.kernel = self.own_kernel or (self.tiled and group in KERNEL_GROUPS)
        if self.own_kernel or self.tiled:
            packed, scale_zeros = self.product.backend.pack_int4(codes, scales, offsets, dtype)
        else:  # nibble pairs, and torch's (code - 8) * scale + zero
            packed = codes[:, ::2] | (codes[:, 1::2] << 4)
            scale_zeros = backend_torch.int4_scale_zeros(scales, offsets, dtype)
        self.register_buffer("packed", packed.to(codes.device))
        self.register_buffer("scale_zeros", scale_zeros.to(codes.device))  # own layout: pack_int4's params

    @property
    def simulated(self) -> bool:  # a kernel runs on the CPU, and Triton's (same tiled layout) on the GPU
        return not (self.kernel and (self.packed.is_cpu or self.product.name == "triton"))

    @classmethod
    def from_affine(cls, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int,
                    bias: torch.Tensor | None, dtype: torch.dtype | None = None,
                    int8_activations: bool = False) -> Int4Linear:
        """From codes uint8 [out, in] in 0..15 with w_hat = scale * code + offset (scales, offsets [out, in // group]).
        `dtype` is the compute dtype (default: the bias's, else bfloat16); parameters are stored in it."""
        dtype = dtype or (bias.dtype if bias is not None else torch.bfloat16)
        return cls(codes.to(torch.uint8), scales, offsets, group, bias, dtype, int8_activations)

    def kernel_weights(self) -> cpu_kernels.KernelWeight | None:
        """Packed codes, scales and offsets for the one-call decoder layer, or None where its kernel does not run."""
        if self.own_kernel and self.bias is None:
            return cpu_kernels.KernelWeight(self.packed, self.scale_zeros, self.group, self.int8_activations)
        return None

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Unpacked codes uint8 [out, in] (or [len(rows), in] for the given rows)."""
        p = self.packed
        if self.own_kernel:
            return cpu_kernels.unpack_int4(p) if rows is None else cpu_kernels.int4_rows(p, rows)
        if not self.tiled:
            p = p if rows is None else p[rows]
            return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)
        tiles = p.view(-1, self.in_features, _TILE // 2)  # [out/64, in, 32]: byte j holds rows j and j+32
        if rows is None:
            both = torch.stack([tiles & 15, tiles >> 4], dim=2)  # [out/64, in, 2, 32]
            return both.permute(0, 2, 3, 1).reshape(self.out_features, self.in_features)
        r = rows % _TILE
        byte = tiles[rows // _TILE, :, r % (_TILE // 2)]  # [T, in]
        return torch.where((r < _TILE // 2)[:, None], byte & 15, byte >> 4)

    def _weight(self, codes: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if self.own_kernel:  # only the rows asked for: a tied embedding looks up one row per step
            scale, offset = cpu_kernels.int4_params(self.scale_zeros, rows)
            levels = codes.float()
        else:
            sz = self.scale_zeros.transpose(0, 1)  # [out, in/group, 2]
            scale, offset = sz[..., 0], sz[..., 1]
            if rows is not None:
                scale, offset = scale[rows], offset[rows]
            levels = codes.float() - 8
        scale = scale.float().repeat_interleave(self.group, dim=1)
        offset = offset.float().repeat_interleave(self.group, dim=1)
        return (levels * scale + offset).to(self.scale_zeros.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self._weight(self.codes(), None)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._weight(self.codes(ids), ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel and (x.is_cpu or self.product.name == "triton") and x.dtype == self.scale_zeros.dtype:
            return self.product.run(x, self.packed, self.scale_zeros, self.group, self.bias)
        return super().forward(x)

    def weight_nbytes(self) -> int:
        return self.packed.numel() + self.scale_zeros.numel() * self.scale_zeros.element_size()


class LowBitLinear(CompressedLinear):
    """Weight = scale * code + offset per group of `group` inputs, with 2- or 3-bit codes packed densely row
    by row (`formats.pack_codes`: 3 bits take 3 bytes per 8 weights) and scales and offsets in the compute
    dtype. No kernel multiplies these codes here: forward dequantizes and runs a dense matmul (simulated)."""

    simulated = True

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int, bits: int,
                 bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group, self.bits, self.bias = group, bits, bias
        self.register_buffer("packed", pack_codes(codes.to(torch.uint8), bits))  # [out, ceil(in * bits / 8)]
        self.register_buffer("scales", scales.to(dtype))  # [out, in // group]
        self.register_buffer("offsets", offsets.to(dtype))

    def _weight(self, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        codes = unpack_codes(packed, self.bits, self.in_features).view(len(packed), -1, self.group).float()
        w = codes * scales.float()[..., None] + offsets.float()[..., None]
        return w.view(len(packed), self.in_features).to(self.scales.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self._weight(self.packed, self.scales, self.offsets)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._weight(self.packed[ids], self.scales[ids], self.offsets[ids])

    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.offsets))


def affine_linear(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int, bits: int,
                  bias: torch.Tensor | None, dtype: torch.dtype, int8_activations: bool = False) -> CompressedLinear:
    """The layer holding w_hat = scale * code + offset: `Int4Linear` (kernels) for 4 bits, else `LowBitLinear`."""
    if bits == 4:
        return Int4Linear.from_affine(codes, scales, offsets, group, bias, dtype, int8_activations)
    layer = LowBitLinear(codes, scales, offsets, group, bits, bias, dtype)
    layer.int8_activations = int8_activations
    return layer


@register("compression", "int4", lossless=False)
@dataclass
class Int4(WeightTransform):
    """Group-wise asymmetric int4 weight-only quantization, round to nearest (the RTN baseline of GPTQ,
    arXiv 2210.17323, and AWQ, arXiv 2306.00978).

    Each run of `group` consecutive inputs of a row gets a scale and offset spanning its minimum to its
    maximum; weights round to the nearest of 16 levels: half a byte per weight plus a (scale, offset) pair per
    group, 28% of bf16 at group 64. On CPU it runs in the workbench's int4 kernel (bf16, which the one-call
    decoder layer also takes) or torch's `_weight_int4pack_mm_for_cpu` (other dtypes, or where the workbench's
    kernels do not build); elsewhere it dequantizes (simulated).
    `bits` 3 or 2 keep the same grid with 8 or 4 levels, codes packed at 3 or 2 bits (`LowBitLinear`, real
    bytes, simulated speed: no kernel): the round-to-nearest baselines of low-bit methods (`decoupleq`).
    `act=int8` also rounds each layer's inputs to int8 per block of 32 (as `int8`'s option), so the C kernel
    multiplies nibbles by bytes with AVX512-VNNI dot products (W4A8, as llama.cpp's Q4 x Q8 CPU path).
    Left out: activation-aware scaling (AWQ) and error compensation (see `gptq`, `eora`).
    """

    stage = "quantize"

    group: int = param(64, "inputs per scale/offset group; must divide every compressed layer's inputs "
                       "(576 = 9 x 64: use 32 or 64)", choices=KERNEL_GROUPS)
    bits: int = param(4, "bits per weight; 3 and 2 are packed densely and run simulated (no kernel)",
                      choices=(2, 3, 4))
    head: bool = param(False, "also compress the LM head / tied embedding")
    act: str = param("float", ACT_HELP, choices=ACTIVATIONS)

    def apply(self, model, ctx: CompressionContext) -> None:
        sites = self.sites(model)
        for site in sites:
            check_group("int4", site, self.group)
        if self.act == "int8":
            check_int8_activations("int4", sites)
        for site in sites:
            codes, scales, offsets = quantize_rtn_int4(dense_weight(site.module), self.group, ctx.dtype, self.bits)
            self.replace(model, site, affine_linear(codes, scales, offsets, self.group, self.bits,
                                                    site.module.bias, ctx.dtype, self.act == "int8"))
