"""decoupleQ: 2-bit (or 3-bit) uniform weights whose integer codes and float scales are solved as one
constrained least-squares problem per layer, instead of being read off the weights' min and max.

Paper: "decoupleQ: Towards 2-bit Post-Training Uniform Quantization via decoupling Parameters into Integer
and Floating Points", Guo et al., arXiv 2404.12759.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.compression.base import CompressionContext, LinearSite, WeightTransform, check_group, dense_weight
from workbench.compression.calibration import layerwise
from workbench.compression.gptq import gptq_quantize
from workbench.compression.int4 import KERNEL_GROUPS, affine_linear, quantize_rtn_int4
from workbench.registry import param, register


def layer_loss(w0: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """The layer's output error on the calibration inputs, tr((W_hat - W0) H (W_hat - W0)ᵀ) (eq. 4's objective)."""
    d = w_hat - w0
    return float(((d @ h) * d).sum())


def expand(params: torch.Tensor, group: int) -> torch.Tensor:
    """Per-group values [out, in // group] -> per weight [out, in]."""
    return params.repeat_interleave(group, dim=1)


def solve_scales(codes: torch.Tensor, w0: torch.Tensor, h: torch.Tensor, group: int,
                 ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The float step: with codes Q [out, in] fixed (integer or relaxed), the scales and offsets
    [out, in // group] minimising tr((S⊙Q + Z - W0) H (...)ᵀ), in closed form per row: with A [in, 2G] mapping
    a row's (s_1..s_G, z_1..z_G) to its weights, θ = (AᵀHA)⁻¹ AᵀH w0. H couples the groups of a row, so
    each row solves one 2G x 2G system (G groups)."""
    out_f, in_f = codes.shape
    n = in_f // group
    q = codes.float().view(out_f, n, group)
    hb = h.view(in_f, n, group)
    hq = torch.einsum("jbk,rbk->rjb", hb, q).view(out_f, n, group, n)  # Σ_{k in group b} H_jk Q_rk
    m_ss = torch.einsum("raj,rajb->rab", q, hq)
    h_sum = hb.sum(-1).view(n, group, n)  # Σ_{k in group b} H_jk
    m_sz = torch.einsum("raj,ajb->rab", q, h_sum)
    m_zz = h_sum.sum(1).expand(out_f, n, n)
    m = torch.cat((torch.cat((m_ss, m_sz), 2), torch.cat((m_sz.transpose(1, 2), m_zz), 2)), 1)
    hw = (w0.float() @ h).view(out_f, n, group)
    rhs = torch.cat(((q * hw).sum(-1), hw.sum(-1)), 1)
    m = m + ridge * m.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(2 * n, device=m.device)
    theta = torch.linalg.solve(m, rhs)
    return theta[:, :n], theta[:, n:]


def relaxed_codes(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, w0: torch.Tensor,
                  h: torch.Tensor, group: int, maxq: int, steps: int) -> torch.Tensor:
    """The integer step, relaxed (the paper's first approximation): codes continuous in the box [0, maxq],
    found by projected gradient descent on the layer loss with the scales fixed; each row steps by 1/L with L
    its gradient's Lipschitz constant, 2 max(s²) λ_max(H)."""
    s, z = expand(scales, group), expand(offsets, group)
    lipschitz = 2 * (s * s).amax(1, keepdim=True) * torch.linalg.eigvalsh(h)[-1]
    q = codes.float().clone()
    for _ in range(steps):
        grad = 2 * s * ((s * q + z - w0) @ h)
        q = (q - grad / lipschitz.clamp_min(1e-12)).clamp(0, maxq)
    return q


@torch.no_grad()
def decoupleq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int = 2, group: int = 64, iters: int = 3,
                       steps: int = 20, percdamp: float = 0.01, param_dtype: torch.dtype = torch.float32,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize w [out, in] given H = XᵀX / n: codes uint8 [out, in] in 0..2^bits - 1 and scales, offsets
    [out, in // group] (w_hat = scale * code + offset), solved by alternating minimisation (module docstring)."""
    w0 = w.float()
    maxq = 2 ** bits - 1
    h = hessian.float().clone()
    h += percdamp * torch.diag(h).mean() * torch.eye(len(h), device=h.device)
    codes, scales, offsets = quantize_rtn_int4(w0, group, param_dtype, bits)  # start from round-to-nearest
    best = (layer_loss(w0, expand(scales, group) * codes + expand(offsets, group), h), scales, offsets)
    q = codes.float()
    for _ in range(iters):
        q = relaxed_codes(q, scales, offsets, w0, h, group, maxq, steps)
        scales, offsets = solve_scales(q, w0, h, group)
        loss = layer_loss(w0, expand(scales, group) * q + expand(offsets, group), h)
        if loss < best[0]:
            best = (loss, scales, offsets)
    # Integer codes on the best float grid, rounding errors fed forward through H⁻¹ (GPTQ with fixed scales:
    # the paper's second approximation), then the float step once more for those integer codes.
    fixed = (best[1].to(param_dtype).float(), best[2].to(param_dtype).float())
    codes, _, _ = gptq_quantize(w0, hessian, bits, group, percdamp, act_order=True, param_dtype=param_dtype,
                                fixed=fixed)
    scales, offsets = solve_scales(codes, w0, h, group)
    return codes, scales, offsets


@register("compression", "decoupleq", lossless=False)
@dataclass
class DecoupleQ(WeightTransform):
    """decoupleQ (Guo et al., arXiv 2404.12759): 2-bit uniform weights, integer codes and float scales decoupled.

    Quantization is treated as min over codes Q in {0..2^bits - 1} and floats (s, z) of the layer's output
    error ‖X(W0 - (s⊙Q + z))‖² on calibration inputs, solved by alternating minimisation, layer by layer
    (GPTQ's sequential pass, compression/calibration.py): from round-to-nearest, the codes are relaxed to the
    box [0, 2^bits - 1] and improved by projected gradient descent with (s, z) fixed (`steps`), then (s, z)
    solved in closed form per row with the codes fixed; `iters` rounds, keeping the best. Integer codes then
    come from GPTQ's error-feedback rounding on that fixed grid, and (s, z) are solved once more for them.
    Codes are packed at `bits` per weight, scales and offsets in the compute dtype (`LowBitLinear`: real
    bytes, simulated speed). Left out: the paper's second, block-wise stage (codes frozen, scales and norm
    layers trained on the block's output) and its W2 CUDA kernel.
    """

    stage = "quantize"

    bits: int = param(2, "bits per weight", choices=(2, 3))
    group: int = param(64, "inputs per scale/offset group; must divide every compressed layer's inputs",
                       choices=KERNEL_GROUPS)
    iters: int = param(3, "rounds of (relaxed codes, closed-form scales)", min=0, max=50)
    steps: int = param(20, "projected-gradient steps on the relaxed codes per round", min=1, max=1000)
    percdamp: float = param(0.01, "dampening added to H's diagonal, as a fraction of its mean", min=0.0, max=1.0)
    tokens: int = param(4096, "calibration tokens", min=64)

    def apply(self, model: torch.nn.Module, ctx: CompressionContext) -> None:
        sites = self.sites(model)
        for site in sites:
            check_group("decoupleq", site, self.group)
        ids = ctx.calibration_ids(self.tokens)

        def quantize(layer_sites: list[LinearSite], hessians: dict[str, torch.Tensor]) -> None:
            for site in layer_sites:
                codes, scales, offsets = decoupleq_quantize(
                    dense_weight(site.module), hessians[site.name], self.bits, self.group, self.iters, self.steps,
                    self.percdamp, ctx.dtype)
                self.replace(model, site, affine_linear(codes, scales, offsets, self.group, self.bits,
                                                        site.module.bias, ctx.dtype))

        layerwise(model, sites, ids, quantize)
