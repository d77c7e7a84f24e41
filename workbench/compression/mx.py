"""MX (OCP Microscaling) block formats: 32 low-bit elements sharing one power-of-two E8M0 scale.

Paper: "Microscaling Data Formats for Deep Learning", Rouhani et al., arXiv 2310.10537 (and the OCP
Microscaling Formats (MX) v1.0 specification it describes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.compression.base import CompressionContext, WeightTransform, check_group, dense_weight
from workbench.compression.formats import FORMATS, ElementFormat, ScaledCodeLinear
from workbench.registry import param, register

BLOCK = 32  # elements per shared scale, fixed by the spec
MX_FORMATS = {"fp4": "e2m1", "fp6_e2m3": "e2m3", "fp6_e3m2": "e3m2", "fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2",
              "int8": "int8"}


@torch.no_grad()
def mx_quantize(w: torch.Tensor, fmt: ElementFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes uint8 [out, in] and E8M0 scale bytes uint8 [out, in // 32] of w [out, in].

    The spec's conversion (section 6.3): the shared exponent is floor(log2(max |v|)) − emax of the element
    format, clamped to E8M0's range; each element v / 2^exponent is rounded to the nearest representable
    value, saturating at the format's largest. An all-zero block gets the smallest scale (its codes are 0)."""
    out_f, in_f = w.shape
    blocks = w.float().reshape(out_f, in_f // BLOCK, BLOCK)
    absmax = blocks.abs().amax(-1)
    exponent = torch.floor(torch.log2(absmax.clamp(min=2.0 ** -127))) - fmt.emax
    exponent = exponent.clamp(-127, 127)
    codes = fmt.encode(blocks / torch.exp2(exponent)[..., None]).reshape(out_f, in_f)
    return codes, (exponent + 127).to(torch.uint8)


@register("compression", "mx", lossless=False)
@dataclass
class MX(WeightTransform):
    """MX block formats (Rouhani et al., "Microscaling Data Formats for Deep Learning", arXiv 2310.10537):
    weights in blocks of 32 consecutive inputs, each block one shared 8-bit power-of-two scale (E8M0) and 32
    elements of MXFP4 (E2M1), MXFP6 (E2M3 / E3M2), MXFP8 (E4M3 / E5M2) or MXINT8.

    Conversion follows the OCP MX v1.0 spec: shared exponent from the block's largest magnitude minus the
    element format's largest exponent, elements rounded to nearest and saturated. Codes are the formats'
    real bit patterns, packed (4 or 6 bits, or one byte, each) plus one scale byte per block, so bytes are
    real. No kernel multiplies MX here: forward dequantizes and runs a dense matmul (simulated speed).
    Left out: MX activations and MX matrix products (only weights are converted); ties round to the larger
    magnitude instead of to even.
    """

    stage = "quantize"

    format: str = param("fp4", "element format", choices=tuple(MX_FORMATS))

    def apply(self, model: nn.Module, ctx: CompressionContext) -> None:
        sites = self.sites(model)
        for site in sites:
            check_group("mx", site, BLOCK)
        fmt = FORMATS[MX_FORMATS[self.format]]
        for site in sites:
            codes, scales = mx_quantize(dense_weight(site.module), fmt)
            layer = ScaledCodeLinear(codes, fmt, scales, BLOCK, site.module.bias, ctx.dtype, e8m0=True)
            self.replace(model, site, layer)
