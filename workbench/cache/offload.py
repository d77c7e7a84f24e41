"""The "off" tier of a two-tier KV cache: tensors kept outside the fast tier, and the traffic back from it.

ShadowKV and LServe (with offload) move part of the cache off the fast tier and bring back only what a step
selects. On CUDA the fast tier is device memory and the off tier is pinned host memory; on a CPU-only machine
both are host memory, so the off tier is a separate buffer (pinned when a CUDA runtime can pin it) and the
movement is a real gather-and-copy into a fresh fast-tier tensor, counted in bytes and nanoseconds.
"""

from __future__ import annotations

import time

import torch

from workbench.errors import SpecError

from .base import LayerCache


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


class TwoTierLayerCache(LayerCache):
    """A layer whose first `n_prefix` prompt tokens (positions prefix_start .. prefix_start + n_prefix - 1) a
    policy holds in its own two-tier form, before a dense `tail` (the prompt's last tokens and every token
    generated since): the bookkeeping ShadowKV and LServe share. A subclass sets `tail`, `tier` (a HostTier),
    `kv_heads`, `n_prefix`, `prefix_start`, `n_committed`, and says what its fast tier holds (`_fast_tensors`)
    and how it holds the prompt (`held_as`, for the refusal to evict from it)."""

    held_as = "in two tiers"

    @property
    def attends_itself(self) -> bool:
        """Dense attention over the tail (the model's own kernels) until the prompt moves into the two tiers, so
        that the prefill computes exactly what the dense cache does; the two-tier form's attend() after."""
        return self.n_prefix > 0

    def _fast_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def length(self) -> int:
        return self.n_prefix + self.tail.length

    @property
    def positions(self) -> torch.Tensor:
        prefix = torch.arange(self.prefix_start, self.prefix_start + self.n_prefix, device=self.tail.pos.device)
        return torch.cat([prefix.expand(self.kv_heads, -1), self.tail.positions], 1)

    def keep(self, slots: torch.Tensor) -> None:
        n = self.n_prefix
        if n and (slots.dim() != 1 or slots.shape[0] < n or not torch.equal(slots[:n].cpu(), torch.arange(n))):
            raise SpecError(f"{self.name} holds the prompt {self.held_as} and cannot evict from it; drop the "
                            f"eviction policy or use it without {self.name}")
        self.tail.keep(slots[n:] - n)
        self.n_committed = self.length

    def keep_uncommitted(self, offsets: list[int]) -> None:
        self.tail.n_committed = self.n_committed - self.n_prefix
        self.tail.keep_uncommitted(offsets)

    def truncate(self, length: int) -> None:
        self.tail.truncate(length - self.n_prefix)
        self.tail.n_committed = min(self.tail.n_committed, self.tail.length)

    def commit(self, offsets: list[int] | None = None) -> None:
        super().commit(offsets)
        self.tail.n_committed = self.tail.length

    def allocated_bytes(self, seen: set[int]) -> int:
        return self.tail.allocated_bytes(seen) + sum(t.untyped_storage().nbytes() for t in self._fast_tensors())

    def offloaded_bytes(self) -> int:
        return self.tier.nbytes()

    def moved(self) -> tuple[int, int]:
        return self.tier.moved_bytes, self.tier.moved_ns
