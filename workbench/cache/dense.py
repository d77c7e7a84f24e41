"""The dense layer cache: preallocated k/v buffers that grow geometrically and give back what eviction frees, and
the `dense` policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.base import CachePolicy, LayerCache
from workbench.models.config import ModelConfig
from workbench.registry import register

EVICT_SPARE = 64  # free slots kept after an eviction shrinks the buffers: the next steps' tokens (trees too) fit
SHRINK_SLACK = 16  # spare slots never worth a reallocation


class DenseLayerCache(LayerCache):
    """k, v stored as [kv_heads, capacity, head_dim]; appends write in place, so a decode step copies
    only the new token. `keep` gathers only from the first slot that moves, then gives the freed slots back
    (`fit`): the buffers shrink to the kept tokens plus `spare` slots (at least `floor`) when they are more than
    half as large again, so an evicting policy's memory follows its budget, not the context length."""

    floor = 0  # never shrink below this many slots (a compressed form's raw tail: its residual window)
    spare = EVICT_SPARE

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, capacity: int):
        capacity = max(capacity, 1)
        self.k = torch.empty(kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.pos = torch.empty(kv_heads, capacity, dtype=torch.long, device=device)
        self._length = 0
        self.n_committed = 0

    @property
    def length(self) -> int:
        return self._length

    @property
    def head_dim(self) -> int:
        return self.k.shape[2]

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def positions(self) -> torch.Tensor:
        return self.pos[:, : self._length]

    def _grow(self, needed: int) -> None:
        self._resize(max(needed, 2 * self.capacity))

    def _resize(self, capacity: int) -> None:
        for name in ("k", "v", "pos"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], capacity, *old.shape[2:])
            new[:, : self._length] = old[:, : self._length]
            setattr(self, name, new)

    def limit(self, capacity: int) -> None:
        """Cap the buffers at `capacity` slots (never below the held tokens): for a policy that bounds what a layer
        holds, so that the capacity the engine sized for the whole run is not allocated up front."""
        capacity = max(capacity, self._length, 1)
        if self.capacity > capacity:
            self._resize(capacity)

    def fit(self) -> None:
        """Give spare capacity back: reallocate the buffers at max(floor, held tokens + spare) slots when they are
        over half as large again (and SHRINK_SLACK slots larger). Growth doubles, so a cache that shrinks and
        grows again pays amortised copies."""
        target = max(self.floor, self._length + self.spare)
        if self.capacity - target > max(SHRINK_SLACK, target // 2):
            self._resize(target)

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        start = self._reserve(positions)
        self.k[:, start: start + k.shape[1]] = k
        self.v[:, start: start + k.shape[1]] = v

    def writable_buffers(self, positions: torch.Tensor, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        if type(self) is not DenseLayerCache or self.observer is not None or self.k.dtype != dtype:
            # subclasses keep more per token; an observer must see the keys
            return None
        start = self._reserve(positions)  # first: it may grow (replace) the buffers
        return self.k, self.v, start

    def claim(self, n: int) -> None:
        """Count `n` more slots as held: tokens a static step (workbench/models/static_step.py) wrote into the
        buffers itself, positions included."""
        self._length += n

    def _reserve(self, positions: torch.Tensor) -> int:
        """Slots for the new tokens at `positions`; returns the first."""
        start, end = self._length, self._length + positions.shape[-1]  # positions: [T] or [kv_heads, T]
        if end > self.capacity:
            self._grow(end)
        self.pos[:, start:end] = positions
        self._length = end
        return start

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, : self._length], self.v[:, : self._length]

    def keep(self, slots: torch.Tensor) -> None:
        n = slots.shape[-1]
        if slots.dim() == 2:  # a per-head selection
            src = slots.to(self.pos.device)
            index = src[:, :, None].expand(-1, -1, self.k.shape[2])
            self.k[:, :n] = self.k.gather(1, index)
            self.v[:, :n] = self.v.gather(1, index)
            self.pos[:, :n] = self.pos.gather(1, src)
        else:
            # Find the first slot that moves on the host (slots are small), so a GPU cache is not synchronised.
            moved = (slots.cpu() != torch.arange(n)).nonzero()
            if moved.numel():
                first = int(moved[0])
                src = slots[first:].to(self.pos.device)
                self.k[:, first:n] = self.k[:, src]
                self.v[:, first:n] = self.v[:, src]
                self.pos[:, first:n] = self.pos[:, src]
        self._length = n
        self.n_committed = n
        self.fit()

    def keep_uncommitted(self, offsets: list[int]) -> None:
        # only the slots after the first one that moves are copied (a tree's accepted path: a few tokens)
        start = self.n_committed
        first = next(i for i, offset in enumerate(offsets) if offset != i)
        src = torch.tensor(offsets[first:], device=self.pos.device) + start
        dst = slice(start + first, start + len(offsets))
        self.k[:, dst] = self.k[:, src]  # the right side is a copy, so overlapping slots are safe
        self.v[:, dst] = self.v[:, src]
        self.pos[:, dst] = self.pos[:, src]
        self._length = start + len(offsets)

    def truncate(self, length: int) -> None:
        self._length = min(length, self._length)

    def allocated_bytes(self, seen: set[int]) -> int:
        if type(self) is not DenseLayerCache:  # subclasses hold more than the three buffers
            return super().allocated_bytes(seen)
        return sum(t.untyped_storage().nbytes() for t in (self.k, self.v, self.pos))  # never shared with others

    def nbytes(self) -> int:
        kv_heads, _, head_dim = self.k.shape
        return self._length * kv_heads * (2 * head_dim * self.k.element_size() + self.pos.element_size())

    def head_stats(self) -> tuple[list[int], list[int], list[int], list[float]]:
        heads, _, dim = self.k.shape
        data = 2 * self._length * dim * self.k.element_size()
        return [self._length] * heads, [self.nbytes() // heads] * heads, [data] * heads, [1.0] * heads

    def stats_key(self) -> tuple | None:
        # the stats depend on the length and shapes alone; subclasses keep more per token
        if type(self) is not DenseLayerCache:
            return None
        return self._length, self.k.shape, self.k.dtype, self.pos.dtype

    def nbytes_per_head(self) -> torch.Tensor:
        return torch.full((self.k.shape[0],), self.nbytes() // self.k.shape[0], dtype=torch.long)


@register("cache", "dense", lossless=True)
@dataclass
class DensePolicy(CachePolicy):
    """Every token's keys and values in the model's dtype: the full cache other policies compare against."""

    def make_layer_cache(
        self, layer: int, config: ModelConfig, dtype: torch.dtype, device: torch.device, capacity: int
    ) -> LayerCache:
        return DenseLayerCache(config.num_kv_heads, config.head_dim, dtype, device, capacity)
