"""int8: per-output-channel symmetric weight-only quantization, on an int8 CPU matmul.

Paper: LLM.int8()'s vector-wise weight quantization (Dettmers et al., arXiv 2208.07339), weight-only.
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
    check_int8_activations,
    dense_weight,
)
from workbench.kernels import cpu as cpu_kernels
from workbench.kernels import dispatch
from workbench.registry import param, register


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of w [out, in]: codes int8 [out, in] in -127..127 and scales [out] in `dtype`
    (rounded first, so codes are nearest on the stored grid)."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(dtype)
    codes = torch.clamp(torch.round(w / scales.float()[:, None]), -127, 127)
    return codes.to(torch.int8), scales


class Int8Linear(CompressedLinear):
    """Weight = code * scale[row]: int8 codes of the [out, in] weight, `scales` [out] in the compute dtype.

    The product is the `linear_int8` operation of the backend `dispatch.linear` picks when the layer is built:
    on CPU, bf16 activations go through the C kernels' int8 product (codes held in their blocked layout,
    float32 accumulation, a few rows of a draft tree for about the cost of one) or, where that cannot run,
    through torch's `_weight_int8pack_mm`; on CUDA, Triton's fused-dequantization product (codes as they are,
    `workbench.kernels.triton_linear`). Elsewhere the layer dequantizes and runs a dense product (the
    reference path, marked simulated). `int8_activations`: the same codes multiplied by int8 activations
    (`linear_int8_a8`: AVX512-VNNI integer dot products in the C kernels)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 int8_activations: bool = False):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.int8_activations = int8_activations
        self.kernel = dispatch.linear("int8_a8" if int8_activations else "int8", codes.device, scales.dtype,
                                      self.out_features, self.in_features)
        self.own_kernel = self.kernel.name == "c"  # the C kernels' layout, which the one-call layers take
        packed, kernel_scales = self.kernel.backend.pack_int8(codes, scales)
        self.register_buffer("codes", packed)
        self.register_buffer("scales", scales)
        # the C kernel applies float32 scales; 4 bytes a row, counted in weight_nbytes
        self.register_buffer("scales_f32", kernel_scales if self.own_kernel else None, persistent=False)
        self.bias = bias

    @property
    def simulated(self) -> bool:  # a kernel runs on the CPU, and Triton's on the GPU
        return not self.codes.is_cpu and self.kernel.name != "triton"

    def kernel_weights(self) -> cpu_kernels.KernelWeight | None:
        """Packed codes and float32 row scales for the one-call decoder layer, or None where its kernel does not run."""
        if self.own_kernel and self.bias is None:
            return cpu_kernels.KernelWeight(self.codes, self.scales_f32, int8_activations=self.int8_activations)
        return None

    def dense_codes(self) -> torch.Tensor:
        return cpu_kernels.unpack_int8(self.codes) if self.own_kernel else self.codes

    def dequantized_weight(self) -> torch.Tensor:
        return (self.dense_codes().float() * self.scales.float()[:, None]).to(self.scales.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        codes = cpu_kernels.int8_rows(self.codes, ids) if self.own_kernel else self.codes[ids]
        return (codes.float() * self.scales[ids].float()[:, None]).to(self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.is_cpu or self.kernel.name == "triton") and x.dtype == self.scales.dtype:
            return self.kernel.run(x, self.codes, self.scales_f32 if self.own_kernel else self.scales, self.bias)
        return super().forward(x)

    def weight_nbytes(self) -> int:
        extra = self.scales_f32.numel() * 4 if self.scales_f32 is not None else 0
        return self.codes.numel() + self.scales.numel() * self.scales.element_size() + extra


@register("compression", "int8", lossless=False)
@dataclass
class Int8(WeightTransform):
    """Per-channel symmetric int8 weight-only quantization (LLM.int8()'s vector-wise quantization, Dettmers
    et al., arXiv 2208.07339, without its outlier decomposition, which concerns activations).

    Each output row's weights are scaled by its largest magnitude / 127 and rounded to nearest: one byte per
    weight plus a scale per row, about 50% of bf16. On CPU the matmul runs in the workbench's int8 kernel (or torch's
    `_weight_int8pack_mm` where it cannot run), which reads half the bytes of bf16 decoding.
    `head` (on by default here: int8 costs the head little quality and it is the largest matrix) also
    quantizes the LM head, and a tied embedding then reads its rows from the int8 copy.
    `act=int8` also rounds each layer's inputs to int8, per block of 32 with a float scale (token-wise dynamic
    quantization as in ZeroQuant, Yao et al., arXiv 2206.01861, at the finer grain of ggml's Q8 blocks), so the
    C kernel multiplies bytes by bytes with AVX512-VNNI dot products (W8A8): lossy, and faster on CPUs that
    have them.
    Left out: LLM.int8()'s mixed-precision outlier columns, and SmoothQuant's migration of activation outliers
    into the weights (act=int8 relies on the fine blocks instead).
    """

    stage = "quantize"

    head: bool = param(True, "also compress the LM head / tied embedding")
    act: str = param("float", ACT_HELP, choices=ACTIVATIONS)

    def apply(self, model, ctx: CompressionContext) -> None:
        sites = self.sites(model)
        if self.act == "int8":
            check_int8_activations("int8", sites)
        for site in sites:
            codes, scales = quantize_int8(dense_weight(site.module), ctx.dtype)
            self.replace(model, site, Int8Linear(codes, scales, site.module.bias, self.act == "int8"))
