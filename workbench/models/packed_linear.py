"""Linear layers with oneDNN-packed weights, for bf16 decoding on CPU.

A one-row matrix product (what decoding one token does) through `F.linear` reaches only about 20 GB/s
in bf16 on these CPUs; with the weight reordered once into oneDNN's blocked layout the same product runs
2-3x faster (docs/performance.md has the figures). The results are bitwise those of `F.linear` in bf16,
so packing changes speed, not outputs. float32 stays on `F.linear`: there oneDNN's packed path rounds
differently, and float32 is the exact reference mode.
"""

from __future__ import annotations

import torch
from torch import nn


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """Same call as nn.Linear; the weight lives in oneDNN's layout (a copy: the dense one is released)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, rebuilt from the packed copy (for inspection and weight transforms)."""
        return self.packed.to_dense()

    def packed_nbytes(self) -> int:
        """Bytes of the packed weight (the bias is an ordinary parameter, counted with the others)."""
        return self.out_features * self.in_features * self.packed.element_size()


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear in `model` by a PackedLinear; returns how many were packed."""
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
