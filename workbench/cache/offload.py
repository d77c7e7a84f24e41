"""The "off" tier of a two-tier KV cache: tensors kept outside the fast tier, and the traffic back from it.

ShadowKV and LServe (with offload) move part of the cache off the fast tier and bring back only what a step
selects. On CUDA the fast tier is device memory and the off tier is pinned host memory; on a CPU-only machine
both are host memory, so the off tier is a separate buffer (pinned when a CUDA runtime can pin it) and the
movement is a real gather-and-copy into a fresh fast-tier tensor, counted in bytes and nanoseconds.
"""

from __future__ import annotations

import time

import torch


class HostTier:
    """Holds off-tier tensors and counts what is fetched back: `moved_bytes` and `moved_ns` over the run."""

    def __init__(self, device: torch.device):
        self.device = device  # the fast tier's device, where fetched rows go
        self.pin = torch.cuda.is_available()  # pinning needs a CUDA runtime; a CPU-only build cannot pin
        self.tensors: list[torch.Tensor] = []
        self.moved_bytes = 0
        self.moved_ns = 0

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` in the off tier (host memory, pinned where possible), owned by this tier."""
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.pin)
        host.copy_(t)
        self.tensors.append(host)
        return host

    def fetch(self, host: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """host[h, index[h, ...]] for each leading row h, copied into the fast tier.

        host: [heads, n, dim]; index: [heads, m] (or [heads, T, m]) token indices. Returns [heads, m, dim]
        (or [heads, T, m, dim]) on the fast tier's device."""
        t0 = time.perf_counter_ns()
        flat = index.reshape(index.shape[0], -1).cpu()
        rows = host.gather(1, flat[:, :, None].expand(-1, -1, host.shape[2]))
        out = rows.to(self.device, non_blocking=self.pin).view(*index.shape, host.shape[2])
        self.moved_ns += time.perf_counter_ns() - t0
        self.moved_bytes += out.numel() * out.element_size()
        return out

    def nbytes(self) -> int:
        """Bytes held in the off tier (the storages themselves)."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors)
