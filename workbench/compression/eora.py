"""EoRA: low-rank compensation of compression error in the eigenspace of calibration activations.

Paper: "EoRA: Fine-tuning-free Compensation for Compressed LLM with Eigenspace Low-Rank Approximation",
Liu et al., arXiv 2410.21271.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.compression.base import (
    CompressedLinear,
    CompressionContext,
    LinearSite,
    WeightTransform,
    dense_weight,
    weight_nbytes,
)
from workbench.compression.calibration import layerwise
from workbench.errors import SpecError
from workbench.registry import param, register


@torch.no_grad()
def eora_factors(delta: torch.Tensor, hessian: torch.Tensor, rank: int, percdamp: float = 0.01,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """B [out, rank], A [rank, in] with B A ≈ delta [out, in] minimising ‖(delta − B A) X ᵀ‖ for H = XᵀX / n.

    EoRA's section 3: with H = Q Λ Qᵀ, the output error of ΔW is ‖ΔW Q √Λ‖_F (up to n), so the best rank-r
    ΔW' = ΔW Q √Λ is its truncated SVD U_r Σ_r V_rᵀ, mapped back by (Q √Λ)⁻¹ = √Λ⁻¹ Qᵀ. √Σ_r goes to each
    side so neither factor's magnitude overflows a low-precision dtype. Eigendecomposition in float64;
    dampening (percdamp × mean eigenvalue) keeps directions the calibration never excited from blowing up."""
    h = hessian.double()
    h = h + percdamp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    eigenvalues, q = torch.linalg.eigh(h)
    root = eigenvalues.clamp(min=0).sqrt()
    root = root.clamp(min=root.max() * 1e-6)
    u, s, vh = torch.linalg.svd(delta.double() @ (q * root), full_matrices=False)
    half = s[:rank].sqrt()
    b = u[:, :rank] * half
    a = (half[:, None] * vh[:rank]) @ (q / root).T
    return b.float(), a.float()


class LowRankCompensated(CompressedLinear):
    """Any linear (compressed or not) plus a low-rank correction: y = inner(x) + B (A x).
    Bytes are the inner layer's plus the two adapters'."""

    def __init__(self, inner: nn.Module, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.a = nn.Parameter(a, requires_grad=False)  # [rank, in]
        self.b = nn.Parameter(b, requires_grad=False)  # [out, rank]

    @property
    def simulated(self) -> bool:  # as fast as the layer it wraps, plus two thin matmuls
        return bool(getattr(self.inner, "simulated", False))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inner.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + F.linear(F.linear(x, self.a), self.b)

    def dequantized_weight(self) -> torch.Tensor:
        w = dense_weight(self.inner)
        return (w.float() + self.b.float() @ self.a.float()).to(w.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        inner = self.inner.rows(ids) if isinstance(self.inner, CompressedLinear) else dense_weight(self.inner)[ids]
        return (inner.float() + self.b[ids].float() @ self.a.float()).to(inner.dtype)

    def weight_nbytes(self) -> int:
        return weight_nbytes(self.inner) + sum(t.numel() * t.element_size() for t in (self.a, self.b))


@register("compression", "eora", lossless=False)
@dataclass
class EoRA(WeightTransform):
    """EoRA (Liu et al., "EoRA: Fine-tuning-free Compensation for Compressed LLM with Eigenspace Low-Rank
    Approximation", arXiv 2410.21271): a training-free rank-`rank` correction of whatever error the earlier
    transforms left in each linear, weighted by how calibration activations use each input direction.

    For each compressed linear, ΔW = W_original − W_compressed is projected into the eigenspace of the
    layer's input second moment XᵀX = QΛQᵀ (ΔW Q √Λ), truncated by SVD to `rank`, and projected back, so
    the layer computes compressed(x) + B(Ax) with B [out, rank] and A [rank, in] in the model's dtype.
    Layers are processed in order, each calibrated on the outputs of the already-compensated ones.
    Linears that no earlier transform changed are left alone. Left out: the paper's quantization of the
    adapters themselves and its fused kernel (here the correction is two extra small matmuls).
    """

    stage = "compensate"
    uses_original = True

    rank: int = param(32, "rank of the correction per linear", min=1, max=4096)
    percdamp: float = param(0.01, "dampening added to XᵀX's eigenvalues, as a fraction of their mean",
                            min=0.0, max=1.0)
    tokens: int = param(4096, "calibration tokens", min=64)

    def apply(self, model: nn.Module, ctx: CompressionContext) -> None:
        sites = self.sites(model)
        for site in sites:
            if self.rank > min(site.module.in_features, site.module.out_features):
                raise SpecError(f"eora: rank={self.rank} exceeds {site.name}'s shape "
                                f"[{site.module.out_features}, {site.module.in_features}]; the rank must be "
                                f"at most {min(site.module.in_features, site.module.out_features)}")

        def compensate(layer_sites: list[LinearSite], hessians: dict[str, torch.Tensor]) -> None:
            for site in layer_sites:
                compressed = dense_weight(site.module).float()
                delta = ctx.original_weight(site.name, site.module).float().to(compressed.device) - compressed
                if not delta.any():
                    continue
                b, a = eora_factors(delta, hessians[site.name], self.rank, self.percdamp)
                self.replace(model, site, LowRankCompensated(site.module, a.to(ctx.dtype), b.to(ctx.dtype)))

        layerwise(model, sites, ctx.calibration_ids(self.tokens), compensate)
