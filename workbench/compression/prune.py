"""prune: magnitude pruning of linear weights, unstructured or 2:4, stored as a bitmap or dense.

Paper: "Learning both Weights and Connections for Efficient Neural Networks", Han et al., arXiv 1506.02626
(magnitude pruning); the 2:4 pattern of "Accelerating Sparse Deep Neural Networks", Mishra et al.,
arXiv 2104.08378.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.compression.base import (
    CompressedLinear,
    CompressionContext,
    WeightTransform,
    check_group,
    dense_weight,
)
from workbench.registry import param, register

_BITS = 2 ** torch.arange(8)


def magnitude_mask(w: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """Bool [out, in], True where a weight is kept: per layer the largest-magnitude (1 - sparsity) fraction,
    or in "2:4" the 2 largest of every 4 consecutive inputs."""
    a = w.float().abs()
    if pattern == "2:4":
        top = a.view(a.shape[0], -1, 4).topk(2, dim=-1).indices
        return torch.zeros_like(a, dtype=torch.bool).view(a.shape[0], -1, 4).scatter_(-1, top, True).view(a.shape)
    drop = int(round(sparsity * a.numel()))
    keep = torch.ones(a.numel(), dtype=torch.bool, device=a.device)
    keep[a.flatten().argsort()[:drop]] = False  # argsort, not a threshold: ties cannot change the count
    return keep.view(a.shape)


class SparseLinear(CompressedLinear):
    """A pruned weight held compressed: a bitmap (1 bit per weight, `bitmap` uint8 [out * in / 8]) and the
    kept values in row-major order (`values` [nnz], compute dtype). No sparse kernel runs it here: forward
    rebuilds the dense weight and runs a dense matmul (simulated speed)."""

    simulated = True
    capturable = False  # the bitmap's bit table comes from the CPU, and masked_scatter_ sizes by the data

    def __init__(self, w: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = w.shape
        bits = keep.flatten().view(-1, 8).to(torch.uint8) * _BITS.to(keep.device, torch.uint8)
        self.register_buffer("bitmap", bits.sum(-1, dtype=torch.uint8))
        self.register_buffer("values", w[keep].contiguous())
        self.bias = bias

    def dequantized_weight(self) -> torch.Tensor:
        keep = (self.bitmap[:, None] & _BITS.to(self.bitmap.device, torch.uint8)).bool().flatten()
        w = torch.zeros(keep.numel(), dtype=self.values.dtype, device=self.values.device)
        return w.masked_scatter_(keep, self.values).view(self.out_features, self.in_features)

    def weight_nbytes(self) -> int:
        return self.bitmap.numel() + self.values.numel() * self.values.element_size()


@register("compression", "prune", lossless=False)
@dataclass
class MagnitudePrune(WeightTransform):
    """Magnitude pruning (Han et al., "Learning both Weights and Connections for Efficient Neural Networks",
    arXiv 1506.02626): zero each layer's smallest-magnitude weights, with no retraining.

    `pattern=unstructured` drops the `sparsity` fraction of smallest |w| per layer; `pattern=2:4` keeps the 2
    largest of every 4 consecutive inputs (NVIDIA's semi-structured sparsity, arXiv 2104.08378; sparsity is
    then 0.5). `storage=bitmap` holds a 1-bit mask plus the kept values (56% of bf16 at 50% sparsity) and runs
    as rebuild-then-dense-matmul (simulated speed: there is no sparse CPU kernel here); `storage=dense` keeps
    zeros in an ordinary bf16 layer: no bytes saved, dense speed, and lossless encoders (dfloat11) can follow.
    Left out: retraining, and calibrated criteria (Wanda, SparseGPT).
    """

    stage = "prune"
    needs_dense = True

    sparsity: float = param(0.5, "fraction of each layer's weights set to zero (unstructured)", min=0.0, max=0.99)
    pattern: str = param("unstructured", "which weights may be dropped", choices=("unstructured", "2:4"))
    storage: str = param("bitmap", "bitmap: mask + kept values (bytes saved, simulated speed); dense: zeros kept",
                         choices=("bitmap", "dense"))
    head: bool = param(False, "also compress the LM head / tied embedding")

    def check(self) -> None:
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise ValueError(f"pattern=2:4 fixes sparsity at 0.5; got sparsity={self.sparsity}")

    def keeps_dense(self) -> bool:
        return self.storage == "dense"

    def apply(self, model, ctx: CompressionContext) -> None:
        sites = self.sites(model)
        for site in sites:
            check_group("prune", site, 8 if self.pattern == "unstructured" else 4)  # bitmap bytes, 2:4 groups
        for site in sites:
            w = dense_weight(site.module)
            keep = magnitude_mask(w, self.sparsity, self.pattern)
            if self.storage == "dense" and isinstance(site.module, nn.Linear):
                # A new tensor, never an in-place edit: the loaded weights may share storage with a loader cache.
                pruned = nn.Parameter(w * keep, requires_grad=False)
                if site.module.weight is getattr(model.embed, "weight", None):  # tied: keep it tied
                    model.embed.weight = pruned
                site.module.weight = pruned
            else:
                self.replace(model, site, SparseLinear(w, keep, site.module.bias))
