"""1-bit adapters: a LoRA fine-tune's factors stored as signs with one scale per rank direction.

Paper: "Revisiting the Parameter Efficiency of Adapters from the Perspective of Precision Redundancy",
Jie et al., ICCV 2023, arXiv 2307.16867.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from workbench.compression.delta import DeltaCodec, DeltaTransform, pack_bits, tensor_nbytes, unpack_bits
from workbench.registry import param, register


def sign_quantize(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """1-bit rows of w [rows, cols]: packed signs uint8 [rows, ceil(cols / 8)] (1 = non-negative) and a scale
    per row [rows] in `dtype`, the row's mean magnitude (the least-squares scale of a sign code)."""
    w = w.float()
    padded = F.pad(w >= 0, (0, -w.shape[1] % 8))  # each row starts on a byte
    return pack_bits(padded).view(w.shape[0], -1), w.abs().mean(dim=1).to(dtype)


def sign_dequantize(signs: torch.Tensor, scales: torch.Tensor, cols: int) -> torch.Tensor:
    """The [rows, cols] weight of `sign_quantize`'s codes."""
    bits = unpack_bits(signs.reshape(-1), signs.numel() * 8).view(len(signs), -1)[:, :cols].to(scales.dtype)
    return (bits * 2 - 1) * scales[:, None]


def product_scales(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales for sign(A) [r, in] and sign(B) [out, r] fitted to the product: only c_k = s^A_k s^B_k matters to
    ΔŴ = Σ_k c_k sign(b_k) sign(a_k)ᵀ, so c [r] is the least-squares fit of ΔŴ to B A (an r × r system:
    G_kl = (sign b_k · sign b_l)(sign a_k · sign a_l), h_k = sign(b_k)ᵀ B A sign(a_k)), split as √|c_k| per side
    with c_k's sign on A's scale."""
    sa, sb = torch.where(a >= 0, 1.0, -1.0).double(), torch.where(b >= 0, 1.0, -1.0).double()  # [r, in], [out, r]
    gram = (sb.T @ sb) * (sa @ sa.T)
    target = ((sb.T @ (b.double() @ a.double())) * sa).sum(dim=1)
    c = torch.linalg.lstsq(gram, target[:, None]).solution[:, 0]
    root = c.abs().sqrt()
    return (root * c.sign()).to(dtype), root.to(dtype)


class OneBitLora(DeltaCodec):
    """ΔW = scale · B̂ Â: A [r, in] as signs with a scale per row, B [out, r] as signs with a scale per column
    (stored transposed, [r, out], so each rank direction is one packed row). Applied as two thin products."""

    simulated = False  # the factors are unpacked per call, but the products are LoRA's own two thin ones

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype, fit: str = "factor"):
        super().__init__()
        a_signs, a_scales = sign_quantize(a, dtype)
        b_signs, b_scales = sign_quantize(b.T, dtype)
        if fit == "product":
            a_scales, b_scales = product_scales(a, b, dtype)
        self.register_buffer("a_signs", a_signs)
        self.register_buffer("a_scales", a_scales)
        self.register_buffer("b_signs", b_signs)
        self.register_buffer("b_scales", b_scales)
        self.in_features, self.out_features, self.scale = a.shape[1], b.shape[0], scale

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Â [r, in] and B̂ [out, r] in the model's dtype."""
        a = sign_dequantize(self.a_signs, self.a_scales, self.in_features)
        return a, sign_dequantize(self.b_signs, self.b_scales, self.out_features).T

    def decode(self) -> torch.Tensor:
        a, b = self.factors()
        return (b.float() @ a.float() * self.scale).to(a.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.scale

    def nbytes(self) -> int:
        return tensor_nbytes(self.a_signs, self.a_scales, self.b_signs, self.b_scales)


@register("compression", "adapter1bit", lossless=False)
@dataclass
class Adapter1Bit(DeltaTransform):
    """1-bit adapters (Jie et al., "Revisiting the Parameter Efficiency of Adapters from the Perspective of
    Precision Redundancy", ICCV 2023): the cached LoRA fine-tune's factors (see `finetune`, tune=lora)
    stored in one bit per entry.

    The paper finds adapters sit in flat minima, so their weights survive very low precision. Each factor is
    quantized to sign(w) times a scale, the scale minimising the squared quantization error (the mean
    magnitude): one per row of A [r, in] and one per column of B [out, r], i.e. one per rank direction on each
    side. Bytes: r·(in + out) bits plus 2r scales, about 1/16 of the factors in bf16. Left out: the paper's
    quantization-aware training of the adapter (here the trained full-precision factors are quantized after
    training) and its other adapter forms (here LoRA only).
    """

    modes = ("lora", "lora1bit")

    fit: str = param("factor", "scales: factor (each factor's least-squares scale, the paper's) or product (fitted "
                     "so the 1-bit product is least-squares closest to B A)", choices=("factor", "product"))

    tune: str = param("lora1bit", "the cached LoRA fine-tune it stores in 1 bit: lora1bit (trained through its "
                      "1-bit form, as the paper does) or lora (quantized after training)",
                      choices=("lora", "lora1bit"))

    def codec(self, name: str, entry: dict[str, Any], dtype: torch.dtype) -> DeltaCodec:
        return OneBitLora(entry["a"], entry["b"], entry["scale"], dtype, self.fit)
