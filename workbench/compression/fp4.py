"""LLM-FP4: 4-bit floating-point weights with a searched format and per-channel (or group) clipping.

Paper: "LLM-FP4: 4-Bit Floating-Point Quantized Transformers", Liu et al., arXiv 2310.16836.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.compression.base import CompressionContext, WeightTransform, check_group, dense_weight
from workbench.compression.calibration import second_moments
from workbench.compression.formats import FORMATS, ElementFormat, ScaledCodeLinear
from workbench.registry import param, register

FP4_FORMATS = ("e2m1", "e1m2", "e3m0")
SCALE_DTYPE = torch.float16  # scales are stored so; the search measures error with the stored value


@torch.no_grad()
def fp4_search(w: torch.Tensor, formats: list[ElementFormat], group: int, ratios: torch.Tensor,
               importance: torch.Tensor | None = None) -> tuple[ElementFormat, torch.Tensor, torch.Tensor]:
    """Best format for the whole tensor and best maximum value per (row, group): (format, codes [out, in],
    float16 scales [out, in // group]). Error is Σ importance_j (ŵ_j − w_j)² (importance = mean x_j² on
    calibration text, or 1: plain weight MSE); each group keeps the clipping ratio with the least error."""
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, in_f // group, group)
    imp = torch.ones(in_f) if importance is None else importance.float()
    imp = imp.to(w.device).reshape(1, in_f // group, group)
    absmax = wg.abs().amax(-1)  # [out, groups]
    best = None
    for fmt in formats:
        table = fmt.table().to(w.device)
        best_err = torch.full_like(absmax, float("inf"))
        best_scale = torch.ones_like(absmax)
        for ratio in ratios:
            # The maximum representable value is ratio × |w|max: LLM-FP4's flexible exponent bias b per channel
            # is this real scale (2^-b relative to the standard bias), so searching one searches the other.
            scale = (absmax * ratio / fmt.max_value).to(SCALE_DTYPE).float().clamp(min=2.0 ** -24)
            deq = table[fmt.encode(wg / scale[..., None]).long()] * scale[..., None]
            err = ((deq - wg) ** 2 * imp).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
        total = float(best_err.sum())
        if best is None or total < best[0]:
            best = (total, fmt, best_scale)
    _, fmt, scale = best
    codes = fmt.encode(wg / scale[..., None]).reshape(out_f, in_f)
    return fmt, codes, scale.to(SCALE_DTYPE)


@register("compression", "fp4", lossless=False)
@dataclass
class FP4(WeightTransform):
    """LLM-FP4 (Liu et al., "LLM-FP4: 4-Bit Floating-Point Quantized Transformers", arXiv 2310.16836):
    weights as 4-bit minifloats (sign + exponent/mantissa split E2M1, E1M2 or E3M0) times a float16 scale
    per output channel (or per `group` inputs).

    As in the paper, the format (when `format=search`, per layer) and each channel's maximum value
    (equivalently its exponent bias) are searched to minimise reconstruction error: `steps` clipping ratios
    of the channel's largest weight in [`min_clip`, 1]; error weighted by the mean squared calibration
    activation of each input when `calibrate`, plain weight MSE otherwise. Codes are stored packed two per
    byte with float16 scales. No kernel multiplies FP4 here: forward dequantizes and runs a dense matmul
    (simulated speed). Left out: the paper's FP4 activations (with its pre-shifted exponent bias) and its
    block-output reconstruction objective (here a per-input diagonal weighting of the weight error).
    """

    stage = "quantize"

    format: str = param("search", "element format, or search over all three per layer",
                        choices=("search", *FP4_FORMATS))
    group: int = param(0, "inputs per scale; 0 = one scale per output channel", min=0)
    steps: int = param(16, "clipping ratios searched per channel/group", min=1, max=256)
    min_clip: float = param(0.5, "smallest clipping ratio searched (largest is 1)", min=0.05, max=1.0)
    calibrate: bool = param(True, "weight the error by calibration activations (else plain weight MSE)")
    tokens: int = param(2048, "calibration tokens (with calibrate)", min=64)

    def apply(self, model: nn.Module, ctx: CompressionContext) -> None:
        sites = self.sites(model)
        for site in sites:
            check_group("fp4", site, self.group or site.module.in_features)
        importance = second_moments(model, sites, ctx.calibration_ids(self.tokens), diagonal=True) \
            if self.calibrate else {}
        formats = [FORMATS[f] for f in (FP4_FORMATS if self.format == "search" else (self.format,))]
        ratios = torch.linspace(self.min_clip, 1.0, self.steps) if self.steps > 1 else torch.ones(1)
        for site in sites:
            group = self.group or site.module.in_features
            fmt, codes, scales = fp4_search(dense_weight(site.module), formats, group, ratios,
                                            importance.get(site.name))
            self.replace(model, site, ScaledCodeLinear(codes, fmt, scales, group, site.module.bias, ctx.dtype))
