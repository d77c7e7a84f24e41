"""Linear layers with pre-packed weights, for bf16 decoding on CPU.

A one-row matrix product (what decoding one token does) through `F.linear` reaches a fraction of the memory
bandwidth in bf16 on CPUs. With the weight reordered once into a blocked layout the same product runs several
times faster (docs/performance.md has the figures). Two layouts, chosen per layer when it is packed by the kernel
seam (`workbench.kernels.dispatch`, docs/kernels.md):

- the C kernels' (`workbench.kernels.backend_c`, AVX512-BF16) where they build and the shape fits:
  a draft tree of a few rows costs about what one row costs, and each row's result is the same whatever
  the row count, so verifying a draft computes bit-for-bit the products a one-token step computes;
- otherwise the torch backend's: oneDNN's packed layout, whose results are bitwise those of `F.linear`.

Either way the dense weight is released. float32 stays on `F.linear`: it is the exact reference mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.kernels import backend_torch, dispatch
from workbench.kernels.cpu import KernelWeight


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    # the workbench's kernels need AVX512-BF16, where oneDNN's bf16 path (for the shapes they skip) runs too
    return device.type == "cpu" and dtype == torch.bfloat16 and backend_torch.onednn_bf16()


class PackedLinear(nn.Module):
    """Same call as nn.Linear; the weight lives in a packed layout (a copy: the dense one is released). The
    layout and the product are the backend's that `dispatch.linear` picks for this shape, once."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.kernel = dispatch.linear("bf16", weight.device, torch.bfloat16, self.out_features, self.in_features)
        self.own_kernel = self.kernel.name == "c"  # the C kernels' layout, which the one-call layers take
        self.packed = self.kernel.backend.pack_bf16(weight)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.own_kernel and x.dtype != torch.bfloat16:  # another dtype than the one packed: a plain product
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return self.kernel.run(x, self.packed, None if self.bias is None else self.bias.detach())

    def kernel_weights(self) -> KernelWeight | None:
        """The packed weight for the one-call decoder layers, or None where they do not take it."""
        return KernelWeight(self.packed) if self.own_kernel and self.bias is None else None

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, rebuilt from the packed copy (for inspection and weight transforms)."""
        return self.kernel.backend.unpack_bf16(self.packed)

    def packed_nbytes(self) -> int:
        """Bytes of the packed weight (the bias is an ordinary parameter, counted with the others)."""
        return self.out_features * self.in_features * self.packed.element_size()


def packed_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T (+ bias) computed bit for bit as a PackedLinear of `weight` would: for layers that hold
    their weight in another form and must match the plain model exactly (DFloat11)."""
    kernel = dispatch.linear("bf16", x.device, x.dtype, *weight.shape)
    if kernel.name == "c" and weight.dtype == torch.bfloat16:
        return kernel.run(x, kernel.backend.pack_bf16(weight), None if bias is None else bias.detach())
    return F.linear(x, weight, bias)  # bitwise what oneDNN's packed layout gives


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear in `model` by a PackedLinear; returns how many were packed."""
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
