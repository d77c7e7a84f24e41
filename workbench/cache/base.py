"""The KV cache core: the layer-cache interface, the model-wide cache, and the policy base class.

Slots and positions. A layer cache holds tokens in slots 0..length-1. Slots 0..n_committed-1 hold
committed tokens; the slots after them hold the tokens of the forward in flight (drafts being verified,
or a self-speculative draft's scratch). `commit(offsets)` keeps the chosen new tokens and drops the rest;
`rollback()` drops every uncommitted token. Eviction policies call `keep(slots)` on committed tokens only.
Each slot remembers the token's logical position, which survives eviction: RoPE is applied before a key
is cached, and the engine, not the cache length, decides the next token's position.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from workbench.models.config import ModelConfig
    from workbench.models.llama import LlamaModel


class AttentionObserver(Protocol):
    """What a policy that scores tokens by attention (H2O, SnapKV, EMS) attaches to a layer cache.

    `observe` sees every forward's queries against everything the layer holds (called by `attention` after
    the new keys are appended, so slots 0..length-1 of the cache line up with the key axis); `commit` then
    says which of the new tokens were kept (offsets relative to the first uncommitted slot, as in
    LayerCache.commit; [] after a rollback). A forward whose tokens are rolled back (a self-speculative
    draft's scratch) is followed by commit([]), so rejected drafts never count.
    """

    def observe(self, cache: LayerCache, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        """q: [heads, T, dim] (RoPE applied); k: [kv_heads, S, dim] every key held, new ones last;
        mask: [T, S] bool (True = may attend), or None for a causal prompt with nothing cached before it."""

    def commit(self, offsets: list[int]) -> None: ...


def tensor_storage_bytes(obj: Any, seen: set[int], depth: int = 0) -> int:
    """Bytes of the tensor storages reachable from `obj` through its attributes, lists, tuples and dicts (to a
    small depth), each storage counted once across calls sharing `seen` (keyed by its data pointer)."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            return 0
        seen.add(key)
        return storage.nbytes()
    if depth > 4:
        return 0
    if isinstance(obj, (list, tuple)):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = vars(obj).values()
    else:
        return 0
    return sum(tensor_storage_bytes(item, seen, depth + 1) for item in items)


class LayerCache(ABC):
    """One layer's keys and values. Shapes: k, v are [kv_heads, tokens, head_dim]."""

    n_committed: int = 0
    observer: AttentionObserver | None = None  # set by policies that need attention weights
    attends_itself = False  # True: `attention` calls attend() instead of attending over view()
    # A `dispatch` operation (q, layer) that answers one decoding step's attention over the stored form itself
    # (a kernel reading KIVI's codes, Mustafar's bitmaps); None: the model attends over `view` or `attend`
    attention_operation: str | None = None
    fixed_shape = False  # a static step's view of the buffers (workbench/models/static_step.py): attends itself

    @abstractmethod
    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store new (uncommitted) tokens after the ones held."""

    @abstractmethod
    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense k, v [kv_heads, length, head_dim] of every held token, for attention."""

    def writable_buffers(self, positions: torch.Tensor, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """For a cache that holds plain k, v buffers [kv_heads, capacity, head_dim] of `dtype` with nothing else
        to update: reserve slots for len(positions) new tokens and return (k, v, first slot), so that a fused
        kernel writes their keys and values itself. None (the default): append through `append`."""
        return None

    @abstractmethod
    def keep(self, slots: torch.Tensor) -> None:
        """Keep only `slots`, compacted in order; all kept tokens become committed.

        slots: [n] ascending slot indices kept in every head, or [kv_heads, n], each row ascending, for a
        per-head selection (H2O, EMS...: every head keeps the same number of tokens, not the same tokens).
        After a per-head keep, slot i of one head and slot i of another may hold different positions."""

    def attend(self, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention over the stored form itself (bitmap-sparse keys, a selection of tokens per query), for
        classes that set `attends_itself`. Called after the new tokens are appended.

        q: [heads, T, dim] (RoPE applied; query heads g*group..(g+1)*group-1 share kv head g); mask: [T, length]
        bool (True = may attend) or None for a causal prompt with nothing before it. Returns [heads, T, dim]."""
        raise NotImplementedError(f"{type(self).__name__} sets attends_itself but has no attend()")

    @property
    @abstractmethod
    def length(self) -> int:
        """Number of tokens held, committed or not."""

    @property
    @abstractmethod
    def positions(self) -> torch.Tensor:
        """Logical positions [kv_heads, length] of the held tokens, per head."""

    @abstractmethod
    def nbytes_per_head(self) -> torch.Tensor:
        """Real bytes held for each kv head, [kv_heads] int64 (keys, values and per-token metadata)."""

    def allocated_bytes(self, seen: set[int]) -> int:
        """Bytes of the tensor storages this layer holds, each counted once across layers sharing `seen` (read
        every step: forms with known buffers override it with something cheaper than the walk). The attention
        observer is a policy's bookkeeping (scores per token), not the stored form, and is left out."""
        return sum(tensor_storage_bytes(value, seen, 1) for name, value in vars(self).items() if name != "observer")

    def nbytes(self) -> int:
        """Real bytes held by this layer (read every step: subclasses make it cheap)."""
        return int(self.nbytes_per_head().sum())

    def offloaded_bytes(self) -> int:
        """Bytes this layer holds off the fast tier (a two-tier form's host buffer, workbench/cache/offload.py);
        `allocated_bytes` and `nbytes` count the fast tier only."""
        return 0

    def moved(self) -> tuple[int, int]:
        """(bytes, nanoseconds) brought back from the off tier so far in this run."""
        return 0, 0

    def head_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per kv head, for the views (workbench/cache/stats.py): tokens held, real bytes, bytes of the K/V
        data alone (no positions or indices), and the fraction of the held tokens' K/V elements stored (below
        1 for pruned forms), as [kv_heads] tensors or lists. This default suits full-precision forms; compressed
        forms override it."""
        k = self.view()[0]
        heads, n, dim = k.shape
        kv = torch.full((heads,), 2 * n * dim * k.element_size(), dtype=torch.long)
        return torch.full((heads,), n, dtype=torch.long), self.nbytes_per_head(), kv, torch.ones(heads)

    def stats_key(self) -> tuple | None:
        """A value that equals another layer's exactly when the two report the same `head_stats` (the stats
        then are computed once per step for all such layers), or None when no such shortcut holds."""
        return None

    def commit(self, offsets: list[int] | None = None) -> None:
        """Keep the uncommitted tokens at `offsets` (relative to the first uncommitted slot; None = all)."""
        n_new = self.length - self.n_committed
        if offsets is None:
            offsets = list(range(n_new))
        if self.observer is not None:
            self.observer.commit(offsets)
        if offsets == list(range(len(offsets))):
            self.truncate(self.n_committed + len(offsets))  # a prefix: no data moves
        else:
            self.keep_uncommitted(offsets)
        self.n_committed = self.length

    def keep_uncommitted(self, offsets: list[int]) -> None:
        """Keep every committed token and the uncommitted ones at `offsets` (ascending, not a prefix), compacted.
        Subclasses override with something cheaper than a gather over the whole cache."""
        base = torch.arange(self.n_committed)
        new = torch.tensor(offsets, dtype=torch.long) + self.n_committed
        self.keep(torch.cat([base, new]))

    def rollback(self) -> None:
        """Drop every uncommitted token."""
        if self.observer is not None:
            self.observer.commit([])
        self.truncate(self.n_committed)

    def truncate(self, length: int) -> None:
        """Keep the first `length` slots. Subclasses override with something cheaper than a gather."""
        self.keep(torch.arange(length))


class KVCache:
    """The model-wide cache: one LayerCache per layer. Layers may hold different numbers of tokens
    (per-layer eviction budgets, or a layer-skipping draft that wrote only some layers)."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def commit(self, offsets: list[int] | None = None) -> None:
        for layer in self.layers:
            layer.commit(offsets)

    def rollback(self) -> None:
        for layer in self.layers:
            layer.rollback()

    def drop_newest(self, n: int) -> None:
        """Drop the `n` most recently committed tokens of every layer (policies keep slots in order, so they are
        the last ones): a step whose output ended inside its accepted path keeps exactly the context."""
        for layer in self.layers:
            layer.truncate(layer.n_committed - n)
            layer.n_committed = layer.length

    def keep_first(self, length: int) -> None:
        """Keep the first `length` committed tokens of every layer (fewer where a layer holds fewer)."""
        for layer in self.layers:
            layer.truncate(min(length, layer.n_committed))
            layer.n_committed = layer.length

    def nbytes(self) -> int:
        """Live bytes: what the tokens held take in each layer's stored form (keys, values, metadata)."""
        return sum(layer.nbytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        """What the process holds for the cache: every distinct tensor storage its layers reach, counted once
        (`untyped_storage().nbytes()`), spare capacity and full-precision buffers included."""
        seen: set[int] = set()
        return sum(layer.allocated_bytes(seen) for layer in self.layers)

    def offloaded_bytes(self) -> int:
        """Bytes held off the fast tier (two-tier policies: ShadowKV, LServe with offload); 0 for the others."""
        return sum(layer.offloaded_bytes() for layer in self.layers)

    def moved(self) -> tuple[int, int]:
        """(bytes, nanoseconds) fetched from the off tier into the fast tier so far, all layers together."""
        pairs = [layer.moved() for layer in self.layers]
        return sum(b for b, _ in pairs), sum(ns for _, ns in pairs)

    def nbytes_per_layer_head(self) -> torch.Tensor:
        """[layers, kv_heads] real bytes held."""
        return torch.stack([layer.nbytes_per_head() for layer in self.layers])

    def tokens_per_layer(self) -> list[int]:
        return [layer.length for layer in self.layers]


@dataclass
class CachePolicy:
    """Base for cache policies (registered under the `cache` category).

    A policy builds the layer caches (choosing a storage form per layer) and may act after prefill and
    after each step, on committed tokens only. Policies compose in order: each later policy's hooks run
    after the earlier ones'; the last policy that builds layer caches decides the storage form. A policy
    that needs the model itself (an offline calibration) does that work in `prepare`, before the cache exists.
    """

    # Set by subclasses that only mask tokens out instead of freeing their memory; shown in stats.
    simulated = False

    def prepare(self, model: LlamaModel, tokenizer: Any, memory: dict) -> None:
        """Called once per run, before the cache is built (by the engine and by teacher-forced evaluation),
        with the loaded model, its tokenizer (None for tiny random models) and `memory`, a dict kept per
        loaded model across runs (the one drafters get as `DecodeState.memory`). Expensive work, such as
        running calibration text through the model, goes here and its result into `memory` under a key
        naming the policy, so later runs on the same model reuse it. Runs under inference mode."""

    def make_layer_cache(
        self, layer: int, config: ModelConfig, dtype: torch.dtype, device: torch.device, capacity: int
    ) -> LayerCache | None:
        """Return a layer cache, or None to leave the storage form to the previous policy."""
        return None

    def warnings(self, prompt_tokens: int, new_tokens: int) -> list[str]:
        """What a user should know before trusting this run's figures, in plain words: a budget the context
        never reaches (nothing is evicted), or a choice that degenerates on this prompt. `new_tokens` is the
        most the run can generate. The engine puts them in the run's summary (`warnings`)."""
        return []

    def on_cache_built(self, cache: KVCache) -> None:
        """Called once every layer cache exists, before the prefill: attach attention observers here, and
        refuse (SpecError) a storage form this policy cannot work with."""

    def load_prefix(self, cache: KVCache, prompt_ids: list[int]) -> int:
        """Called once before the prefill with the prompt: a policy that holds the cache of the prompt's first
        tokens (CacheGen's file) puts them in `cache`, commits them and returns how many, so that only the rest
        of the prompt is prefilled (at least its last token: it yields the first logits). 0: nothing loaded."""
        return 0

    def on_prefill_end(self, cache: KVCache) -> None:
        """Called once the prompt is committed."""

    def on_step_end(self, cache: KVCache) -> None:
        """Called after each decoding step's tokens are committed."""
