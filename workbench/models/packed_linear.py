"""Linear layers with pre-packed weights, for bf16 decoding on CPU.

A one-row matrix product (what decoding one token does) through `F.linear` reaches a fraction of the memory
bandwidth in bf16 on CPUs. With the weight reordered once into a blocked layout the same product runs several
times faster (docs/performance.md has the figures). Two layouts, chosen per layer when it is packed:

- the workbench's own kernels (`workbench.kernels.cpu`, AVX512-BF16) where they build and the shape fits:
  a draft tree of a few rows costs about what one row costs, and each row's result is the same whatever
  the row count, so verifying a draft computes bit-for-bit the products a one-token step computes;
- otherwise oneDNN's packed layout, whose results are bitwise those of `F.linear`.

Either way the dense weight is released. float32 stays on `F.linear`: it is the exact reference mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.kernels import cpu as cpu_kernels


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    # the workbench's kernels need AVX512-BF16, where oneDNN's bf16 path (for the shapes they skip) runs too
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """Same call as nn.Linear; the weight lives in a packed layout (a copy: the dense one is released)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.own_kernel = cpu_kernels.fits(self.out_features, self.in_features)
        weight = linear.weight.detach()
        if self.own_kernel:
            self.packed = cpu_kernels.pack_bf16(weight)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.own_kernel and x.dtype == torch.bfloat16:
            return cpu_kernels.gemm_bf16(x, self.packed, None if self.bias is None else self.bias.detach())
        if self.own_kernel:  # another dtype than the one packed: a plain product (not a decoding path)
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def kernel_weights(self) -> cpu_kernels.KernelWeight | None:
        """The packed weight for the one-call decoder layer, or None where its kernel does not run."""
        return cpu_kernels.KernelWeight(self.packed) if self.own_kernel and self.bias is None else None

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, rebuilt from the packed copy (for inspection and weight transforms)."""
        return cpu_kernels.unpack_bf16(self.packed) if self.own_kernel else self.packed.to_dense()

    def packed_nbytes(self) -> int:
        """Bytes of the packed weight (the bias is an ordinary parameter, counted with the others)."""
        return self.out_features * self.in_features * self.packed.element_size()


def packed_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T (+ bias) computed bit for bit as a PackedLinear of `weight` would: for layers that hold
    their weight in another form and must match the plain model exactly (DFloat11)."""
    if x.is_cpu and x.dtype == weight.dtype == torch.bfloat16 and cpu_kernels.fits(*weight.shape):
        return cpu_kernels.gemm_bf16(x, cpu_kernels.pack_bf16(weight), None if bias is None else bias.detach())
    return F.linear(x, weight, bias)  # bitwise what oneDNN's packed layout gives


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear in `model` by a PackedLinear; returns how many were packed."""
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
