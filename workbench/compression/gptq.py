"""GPTQ: int4 group-wise weights chosen column by column to minimise the layer's output error on calibration text.

Paper: "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", Frantar et al.,
arXiv 2210.17323.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.compression.base import (
    CompressionContext,
    LinearSite,
    WeightTransform,
    check_group,
    dense_weight,
)
from workbench.compression.calibration import layerwise
from workbench.compression.int4 import KERNEL_GROUPS, affine_linear, affine_params
from workbench.registry import param, register


def _group_params(w: torch.Tensor, bits: int, param_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset [out] of one group's columns w [out, g] on int4's grid, as `affine_linear`'s layer will
    hold them (4 bits: scale and zero = offset + 8 * scale rounded to `param_dtype`; fewer: scale and offset),
    so the error GPTQ feeds forward is exact."""
    scale, offset = affine_params(w, 2 ** bits - 1)
    scale = scale.to(param_dtype).float()
    if bits < 4:
        return scale, offset.to(param_dtype).float()
    zero = (offset + 8 * scale).to(param_dtype).float()
    return scale, zero - 8 * scale


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group: int = 64, percdamp: float = 0.01,
                  block: int = 128, act_order: bool = False, param_dtype: torch.dtype = torch.float32,
                  fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize w [out, in] given H = XᵀX / n [in, in]: codes uint8 [out, in], scales and offsets [out, in // group]
    with w_hat = scale * code + offset. Algorithm 1 of the paper, in float32. `fixed` (scales, offsets) gives
    the grid instead of taking it from the weights (decoupleQ's integer step)."""
    w = w.float().clone()
    out_f, in_f = w.shape
    maxq = 2 ** bits - 1
    h = hessian.float().clone()
    dead = torch.diag(h) == 0  # inputs never active: any value works, so zero them
    h[dead, dead] = 1
    w[:, dead] = 0
    n_groups = in_f // group
    scales = torch.zeros(out_f, n_groups, device=w.device)
    offsets = torch.zeros(out_f, n_groups, device=w.device)
    perm = torch.arange(in_f, device=w.device)
    if fixed is not None:
        scales, offsets = fixed[0].float().clone(), fixed[1].float().clone()
    if act_order:
        # Largest-H_jj columns first; group parameters fixed up front from the unquantized weights so each
        # group stays contiguous in storage (the reference code's `static_groups`).
        for g in range(n_groups if fixed is None else 0):
            scales[:, g], offsets[:, g] = _group_params(w[:, g * group:(g + 1) * group], bits, param_dtype)
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    # Dampening keeps the inverse stable: λ = percdamp × mean diagonal (section 4, "Cholesky reformulation").
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(in_f, device=w.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=w.device)
    block = max(block // group, 1) * group  # blocks hold whole groups, so a group's columns are all in view
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = perm[i1 + i]
            g = int(col) // group
            if fixed is None and not act_order and (i1 + i) % group == 0:  # parameters from the already-updated columns
                scales[:, g], offsets[:, g] = _group_params(w1[:, i:i + group], bits, param_dtype)
            scale, offset = scales[:, g], offsets[:, g]
            q = torch.clamp(torch.round((w1[:, i] - offset) / scale), 0, maxq)
            codes[:, col] = q.to(torch.uint8)
            # Spread this column's rounding error over the columns not yet quantized (eq. 3, Cholesky rows).
            e = (w1[:, i] - (q * scale + offset)) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # lazy batch update of the columns after this block
    return codes, scales, offsets


@register("compression", "gptq", lossless=False)
@dataclass
class GPTQ(WeightTransform):
    """GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers", arXiv 2210.17323): int4 group-wise weights calibrated on standard-library docstrings.

    Each linear's weights are quantized one input column at a time on the same asymmetric int4 grid as
    `int4`; after each column, its rounding error is pushed onto the columns not yet quantized through the
    inverse of the layer's input Hessian H = XᵀX / n (dampened by `percdamp`), via its Cholesky factor, with
    updates batched in blocks of `block` columns. `act_order` quantizes columns with the largest H_jj
    first (on by default: it lowered perplexity further on SmolLM2-135M). Layers are quantized in order,
    each calibrated on the outputs of the already-quantized ones (compression/calibration.py).
    The result is an `Int4Linear` (4 bits), so it runs on the same kernels as `int4`. Left out: the paper's
    `true-sequential` order within a layer and its 3-bit/2-bit kernels (bits below 4 are packed densely in a
    `LowBitLinear`, real bytes, dequantized per forward: simulated speed); with `act_order` group parameters are fixed
    before the pass (the reference code's `static_groups`), keeping groups contiguous.
    """

    stage = "quantize"

    bits: int = param(4, "bits per weight (3 or 2 are packed densely, simulated speed)", choices=(2, 3, 4))
    group: int = param(64, "inputs per scale/offset group; must divide every compressed layer's inputs",
                       choices=KERNEL_GROUPS)
    percdamp: float = param(0.01, "dampening added to H's diagonal, as a fraction of its mean", min=0.0, max=1.0)
    block: int = param(128, "columns per lazy batch update", min=1)
    act_order: bool = param(True, "quantize columns in order of decreasing H_jj (better on SmolLM2-135M)")
    tokens: int = param(4096, "calibration tokens", min=64)

    def apply(self, model: torch.nn.Module, ctx: CompressionContext) -> None:
        sites = self.sites(model)
        for site in sites:
            check_group("gptq", site, self.group)
        ids = ctx.calibration_ids(self.tokens)

        def quantize(layer_sites: list[LinearSite], hessians: dict[str, torch.Tensor]) -> None:
            for site in layer_sites:
                w = dense_weight(site.module)
                codes, scales, offsets = gptq_quantize(w, hessians[site.name], self.bits, self.group,
                                                       self.percdamp, self.block, self.act_order, ctx.dtype)
                self.replace(model, site, affine_linear(codes, scales, offsets, self.group, self.bits,
                                                        site.module.bias, ctx.dtype))

        layerwise(model, sites, ids, quantize)
