"""int8: per-output-channel symmetric weight-only quantization, on torch's int8 CPU matmul.

Paper: LLM.int8()'s vector-wise weight quantization (Dettmers et al., arXiv 2208.07339), weight-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.compression.base import CompressedLinear, CompressionContext, WeightTransform, dense_weight, linear_sites
from workbench.registry import param, register


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of w [out, in]: codes int8 [out, in] in -127..127 and scales [out] in `dtype`
    (rounded first, so codes are nearest on the stored grid)."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(dtype)
    codes = torch.clamp(torch.round(w / scales.float()[:, None]), -127, 127)
    return codes.to(torch.int8), scales


class Int8Linear(CompressedLinear):
    """Weight = code * scale[row]: `codes` int8 [out, in], `scales` [out] in the compute dtype.

    On CPU forward is one `_weight_int8pack_mm` (int8 weights, activations in their own dtype, float
    accumulation); elsewhere it dequantizes and runs a dense matmul (the reference path, marked simulated)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.bias = bias

    @property
    def simulated(self) -> bool:  # the kernel runs on CPU only
        return not self.codes.is_cpu

    def dequantized_weight(self) -> torch.Tensor:
        return (self.codes.float() * self.scales.float()[:, None]).to(self.scales.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.codes[ids].float() * self.scales[ids].float()[:, None]).to(self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and x.dtype == self.scales.dtype:  # the decode hot path: one kernel, no reshapes for 2-D x
            y = torch.ops.aten._weight_int8pack_mm(x if x.dim() == 2 else x.reshape(-1, self.in_features),
                                                   self.codes, self.scales)
            if x.dim() != 2:
                y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return super().forward(x)

    def weight_nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * self.scales.element_size()


@register("compression", "int8")
@dataclass
class Int8(WeightTransform):
    """Per-channel symmetric int8 weight-only quantization (LLM.int8()'s vector-wise quantization, Dettmers
    et al., arXiv 2208.07339, without its outlier decomposition, which concerns activations).

    Each output row's weights are scaled by its largest magnitude / 127 and rounded to nearest: one byte per
    weight plus a scale per row, about 50% of bf16. On CPU the matmul runs in torch's int8 weight-only
    kernel (`_weight_int8pack_mm`, bf16 activations), which reads half the bytes of bf16 decoding.
    `head` (on by default here: int8 costs the head little quality and it is the largest matrix) also
    quantizes the LM head, and a tied embedding then reads its rows from the int8 copy.
    Left out: LLM.int8()'s mixed-precision outlier columns and int8 activations.
    """

    stage = "quantize"

    head: bool = param(True, "also compress the LM head / tied embedding")

    def apply(self, model, ctx: CompressionContext) -> None:
        for site in linear_sites(model, self.head):
            codes, scales = quantize_int8(dense_weight(site.module), ctx.dtype)
            self.replace(model, site, Int8Linear(codes, scales, site.module.bias))
