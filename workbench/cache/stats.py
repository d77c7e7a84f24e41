"""Per-step KV-cache statistics for the views: tokens, bytes, bits and sparsity per layer and head, and
sampled, bounded kept-position lists.

`cache_stats` runs after every step (cheap: each layer cache reports its own numbers through
LayerCache.head_stats). The kept positions are costly to ship and store, so they are sampled: on the prefill,
every KEPT_EVERY steps and on the last step, and only while a sample stays under KEPT_MAX_INTS positions
in all (otherwise `kept` is None for that step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from workbench.cache.base import KVCache

KEPT_EVERY = 16  # decode steps between kept-position samples
KEPT_MAX_INTS = 1 << 18  # most positions in one sample (layers x heads x tokens)


@dataclass
class CacheStats:
    """Nested lists are [layer][kv_head].

    tokens: tokens held; bytes: real bytes held (K/V data, scales, bitmaps, positions, residual windows);
    bits: mean bits per K/V element of the held tokens (16 for a dense bf16 cache; positions not counted);
    sparsity: fraction of the context's K/V elements not held (evicted tokens, pruned channels);
    kept: logical positions held per layer and head, on sampled steps only (else None);
    simulated: some policy masks tokens instead of freeing them (its bytes are not really saved).
    """

    tokens: list[list[int]]
    bytes: list[list[int]]
    bits: list[list[float]]
    sparsity: list[list[float]]
    kept: list[list[list[int]]] | None
    simulated: bool

    def to_dict(self) -> dict:
        return asdict(self)


def kept_sampled(step: int, last: bool) -> bool:
    return step == 0 or last or step % KEPT_EVERY == 0


def cache_stats(cache: KVCache, context: int, simulated: bool, with_kept: bool) -> CacheStats:
    """Stats of every layer; `context` = tokens of text the cache has seen (committed prompt + generated)."""
    tokens, nbytes, bits, sparsity = [], [], [], []
    context = max(context, 1)
    same: dict[tuple, tuple] = {}  # stats_key -> the row of the first layer with it
    for layer in cache.layers:
        key = layer.stats_key()
        row = same.get(key) if key is not None else None
        if row is None:
            row = _layer_row(layer, context)
            if key is not None:
                same[key] = row
        for column, value in zip((tokens, nbytes, bits, sparsity), row):
            column.append(list(value))  # a copy per layer: no two layers share a list
    kept = None
    if with_kept and sum(sum(t) for t in tokens) <= KEPT_MAX_INTS:
        kept = [layer.positions.tolist() for layer in cache.layers]
    return CacheStats(tokens, nbytes, bits, sparsity, kept, simulated)


def _layer_row(layer, context: int) -> tuple[list, list, list, list]:
    """One layer's tokens, bytes, bits and sparsity per head."""
    # plain lists: a handful of numbers per layer, read every step, cost less than tensor ops
    n, total, kv, held = (t.tolist() if isinstance(t, torch.Tensor) else t for t in layer.head_stats())
    dim = _head_dim(layer)
    return (n, total, [8 * b / max(2 * dim * x, 1) for b, x in zip(kv, n)],
            [min(max(1 - x * h / context, 0.0), 1.0) for x, h in zip(n, held)])


def _head_dim(layer) -> int:
    head_dim = getattr(layer, "head_dim", None)
    return head_dim if head_dim is not None else layer.view()[0].shape[-1]
