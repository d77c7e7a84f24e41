"""LServe: streaming heads (sinks and a recent window) beside dense heads that read query-selected pages."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.base import CachePolicy, KVCache, LayerCache
from workbench.cache.dense import DenseLayerCache
from workbench.cache.offload import HostTier, TwoTierLayerCache
from workbench.errors import SpecError
from workbench.models.config import ModelConfig
from workbench.registry import param, register


class _HeadMeter:
    """The prefill's observer: hands the prompt's queries and keys to `_measure_heads` once (the prefill itself
    runs the dense cache's attention, TwoTierLayerCache.attends_itself)."""

    def observe(self, cache: LServeLayerCache, q: torch.Tensor, k: torch.Tensor, mask) -> None:
        if cache.local_mass is None:
            cache._measure_heads(q, k)

    def commit(self, offsets: list[int]) -> None:
        pass


class LServeLayerCache(TwoTierLayerCache):
    """One layer. Before `compress` every token is dense in `tail`; after it, for the first n = `n_prefix` prompt
    tokens (positions prefix_start .. prefix_start + n - 1, whole physical pages):

    - streaming kv heads (`streaming` [kv_heads] bool): only the first `sink` tokens, `sink_k`, `sink_v`
      [streaming heads, sink, dim], in the fast tier; the rest of those n tokens is freed;
    - dense kv heads: `k_min`, `k_max` [dense heads, logical pages, dim], each logical page's per-channel key
      bounds, in the fast tier; every key and value, `host_k`, `host_v` [dense heads, n, dim], in the off tier;
    - every head: `tail`, a dense cache of the prompt's last `local` tokens and every token generated since.
    """

    name, held_as = "lserve", "in pages"

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, capacity: int, sink: int,
                 local: int, page: int, physical: int, budget_tokens: int, probe: int):
        self.tail = DenseLayerCache(config.num_kv_heads, config.head_dim, dtype, device, capacity)
        self.kv_heads, self.head_dim = config.num_kv_heads, config.head_dim
        self.sink, self.local, self.page, self.physical = sink, local, page, physical
        self.budget_tokens, self.probe = budget_tokens, probe
        self.tier = HostTier(device)
        self.local_mass: torch.Tensor | None = None  # [kv_heads]: prefill attention on sinks + window
        self.streaming = torch.zeros(self.kv_heads, dtype=torch.bool)
        self.n_prefix, self.prefix_start = 0, 0
        self.sink_k = self.sink_v = self.k_min = self.k_max = self.host_k = self.host_v = None
        self.n_committed = 0
        self.observer = _HeadMeter()

    # -- choosing streaming heads and moving the prompt ------------------------------------------------------
    def _measure_heads(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Each kv head's share of attention on the sinks and the recent `local` keys, over the prompt's last
        `probe` queries (a training-free stand-in for DuoAttention's learned gates). q: [heads, T, dim]."""
        rows = min(self.probe, q.shape[1])
        group = q.shape[0] // self.kv_heads
        keys = k.shape[1]
        qs = q[:, -rows:].float().view(self.kv_heads, group, rows, -1)
        scores = torch.einsum("hgtd,hsd->hgts", qs, k.float()) * self.head_dim ** -0.5
        query_slot = torch.arange(keys - rows, keys, device=q.device)[:, None]
        key_slot = torch.arange(keys, device=q.device)[None]
        probs = torch.softmax(scores.masked_fill(key_slot > query_slot, float("-inf")), -1)
        local = (key_slot < self.sink) | (key_slot > query_slot - self.local)  # [rows, keys]
        self.local_mass = (probs * local).sum(-1).mean((1, 2)).cpu()

    def compress(self, streaming: torch.Tensor) -> None:
        """Move the committed prompt, but its last `local` tokens, into the two-tier form (whole physical pages)."""
        if isinstance(self.observer, _HeadMeter):  # the heads are measured: its work is done
            self.observer = None
        unit = self.page * self.physical
        n = (self.tail.n_committed - self.local) // unit * unit
        self.streaming = streaming.clone()
        if self.n_prefix or n < unit:
            return
        pos = self.tail.positions[0, :n]
        if not torch.equal(pos, pos[0] + torch.arange(n, device=pos.device)) or \
                not (self.tail.positions[:, :n] == pos).all():
            raise SpecError("lserve pages a prompt held whole in every head; put it first in the cache chain, before "
                            "any policy that evicts prompt tokens")
        k, v = (t[:, :n] for t in self.tail.view())  # [kv_heads, n, dim]
        s, d = streaming.to(k.device), ~streaming.to(k.device)
        self.sink_k, self.sink_v = k[s, :self.sink].clone(), v[s, :self.sink].clone()
        pages = k[d].float().view(int(d.sum()), n // self.page, self.page, self.head_dim)
        self.k_min, self.k_max = pages.amin(2).to(k.dtype), pages.amax(2).to(k.dtype)
        self.host_k, self.host_v = self.tier.put(k[d]), self.tier.put(v[d])
        self.n_prefix, self.prefix_start = n, int(pos[0])
        self.tail.keep(torch.arange(n, self.tail.length))  # the tail gives the moved slots back
        self.tail.n_committed = self.tail.length

    def _fast_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.sink_k, self.sink_v, self.k_min, self.k_max) if t is not None]

    # -- attention --------------------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        heads, n_q, dim = q.shape
        group = heads // self.kv_heads
        if mask is None:  # a causal prompt with nothing before it
            mask = torch.ones(n_q, n_q, dtype=torch.bool, device=q.device).tril_()
        tail_k, tail_v = (t.float() for t in self.tail.view())
        tail_mask = mask[:, self.n_prefix:]
        qf = q.float().view(self.kv_heads, group, n_q, dim)
        out = torch.empty_like(qf)
        s = self.streaming.to(q.device)
        if s.any():  # streaming heads: the sinks and the tail, the same keys for every query row
            keys = torch.cat([self.sink_k.float(), tail_k[s]], 1)[:, None]
            values = torch.cat([self.sink_v.float(), tail_v[s]], 1)[:, None]
            visible = torch.cat([mask.new_ones(n_q, self.sink_k.shape[1]), tail_mask], 1)
            out[s] = _attend(qf[s], keys, values, visible)
        if (~s).any():
            out[~s] = self._attend_pages(qf[~s], tail_k[~s], tail_v[~s], tail_mask)
        return out.reshape(heads, n_q, dim).to(q.dtype)

    def _attend_pages(self, q: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor,
                      tail_mask: torch.Tensor) -> torch.Tensor:
        """Dense heads: each query row scores the logical pages by an upper bound of q.k from the per-channel key
        bounds (Quest's bound, summed over the row's query group), a physical page scores its best logical page,
        and the best physical pages filling `budget_tokens` are fetched from the off tier. q: [dense, group, T,
        dim]; tail_k, tail_v: [dense, tail, dim]. Returns [dense, group, T, dim] float32."""
        n_q = q.shape[2]
        bound = torch.maximum(torch.einsum("hgtd,hpd->hgtpd", q, self.k_min.float()),
                              torch.einsum("hgtd,hpd->hgtpd", q, self.k_max.float())).sum((1, 4))  # [dense, T, pages]
        physical = bound.view(*bound.shape[:2], -1, self.physical).amax(-1)  # [dense, T, physical pages]
        unit = self.page * self.physical
        picks = min(max(self.budget_tokens // unit, 1), physical.shape[-1])
        chosen = physical.topk(picks, dim=-1).indices  # [dense, T, picks]
        tokens = (chosen[..., None] * unit + torch.arange(unit, device=q.device)).flatten(2)
        keys = torch.cat([self.tier.fetch(self.host_k, tokens).float(), tail_k[:, None].expand(-1, n_q, -1, -1)], 2)
        values = torch.cat([self.tier.fetch(self.host_v, tokens).float(), tail_v[:, None].expand(-1, n_q, -1, -1)], 2)
        visible = torch.cat([tail_mask.new_ones(n_q, tokens.shape[2]), tail_mask], 1)
        return _attend(q, keys, values, visible)

    # -- the LayerCache contract --------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        self.tail.append(k, v, positions)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held token dense, for inspection only (attention never calls it): dense heads' paged tokens read
        from the off tier (not counted as traffic); streaming heads' freed tokens, past their sinks, as zeros."""
        tail_k, tail_v = self.tail.view()
        if not self.n_prefix:
            return tail_k, tail_v
        out = []
        for sink, host, tail in ((self.sink_k, self.host_k, tail_k), (self.sink_v, self.host_v, tail_v)):
            paged = tail.new_zeros(self.kv_heads, self.n_prefix, self.head_dim)
            paged[self.streaming, :self.sink] = sink
            paged[~self.streaming] = host.to(tail.device)
            out.append(torch.cat([paged, tail], 1))
        return out[0], out[1]

    def nbytes_per_head(self) -> torch.Tensor:
        """Real fast-tier bytes per kv head: its tail, plus its sinks (streaming) or its page bounds (dense)."""
        per_head = self.tail.nbytes_per_head().clone()
        s = self.streaming
        if self.sink_k is not None:
            per_head[s] += (self.sink_k[0].nbytes + self.sink_v[0].nbytes) if s.any() else 0
            per_head[~s] += (self.k_min[0].nbytes + self.k_max[0].nbytes) if (~s).any() else 0
        return per_head

    def head_stats(self) -> tuple[list[int], torch.Tensor, torch.Tensor, list[float]]:
        per_head = self.nbytes_per_head()
        data = per_head - self.tail.length * self.tail.pos.element_size()
        return [self.length] * self.kv_heads, per_head, data, [1.0] * self.kv_heads


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [h, group, T, dim]; k, v [h, T or 1, S, dim]; mask [T, S] bool (True = may attend). [h, group, T, dim]."""
    scores = torch.einsum("hgtd,htsd->hgts", q, k.expand(-1, q.shape[2], -1, -1)) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("hgts,htsd->hgtd", probs, v.expand(-1, q.shape[2], -1, -1))


@register("cache", "lserve", lossless=False)
@dataclass
class LServePolicy(CachePolicy):
    """LServe: some kv heads become streaming heads (sinks + recent window); the rest read query-selected pages.

    "LServe: Efficient Long-sequence LLM Serving with Unified Sparse Attention" (arXiv 2502.14866). Block-sparse
    attention of two kinds. Streaming heads (DuoAttention's finding, which LServe builds on: many heads look only
    at the first tokens and a recent window) keep the `sink` first tokens and the dense tail; the prompt between
    is freed. The other, dense heads use hierarchical paging: each logical page of `page` tokens keeps the
    per-channel minimum and maximum of its keys in the fast tier, and `physical` consecutive logical pages form a
    physical page, the unit fetched. Each decoding query bounds q.k on every logical page from those key bounds,
    scores a physical page by its best logical page, and reads the best physical pages (`budget_tokens` tokens'
    worth) and the tail. Here the dense heads' paged keys and values live in the off tier (a separate host buffer,
    workbench/cache/offload.py; `cache_off_bytes`), and only the selected pages come back each step
    (`cache_moved_bytes`, `cache_moved_s`). The fraction `streaming` of all kv heads (over every layer) with the
    largest share of prefill attention on their sinks and recent window become streaming heads.

    Left out: DuoAttention's trained head gates (heads are ranked from the prompt's own attention instead, a
    training-free proxy computed once per run), LServe's reuse of a page selection over several decoding steps,
    its fused GPU kernels and its sparse prefill; the streaming heads' window is the dense tail (the prompt's
    last `local` tokens and everything generated since), not trimmed again while generating. Lossy.
    """

    streaming: float = param(0.5, "fraction of kv heads (over all layers) made streaming heads", min=0.0, max=1.0)
    sink: int = param(16, "first tokens a streaming head keeps (attention sinks)", min=1, max=4096)
    local: int = param(64, "most recent prompt tokens kept dense for every head", min=0, max=1 << 16)
    page: int = param(16, "tokens per logical page: one pair of key bounds each", min=1, max=1024)
    physical: int = param(4, "logical pages per physical page, the unit a dense head fetches", min=1, max=64)
    budget_tokens: int = param(256, "prompt tokens each decoding query of a dense head reads (whole physical "
                               "pages)", min=1, max=1 << 20)
    probe: int = param(64, "last prompt queries whose attention ranks the heads", min=1, max=4096)

    def check(self) -> None:
        if self.sink > self.page * self.physical:
            raise ValueError(f"sink ({self.sink}) must fit in one physical page (page * physical = "
                             f"{self.page * self.physical} tokens)")

    def warnings(self, prompt_tokens: int, new_tokens: int) -> list[str]:
        unit = self.page * self.physical
        paged = (prompt_tokens - 1 - self.local) // unit * unit  # the prompt's last token is pending
        if paged < unit:
            return [f"lserve: the prompt ({prompt_tokens} tokens) is within the local window (local={self.local}) "
                    "plus one physical page, so nothing is paged; give a longer prompt or lower local"]
        if self.budget_tokens >= paged and self.streaming < 1:
            return [f"lserve: budget_tokens={self.budget_tokens} covers the whole paged prompt ({paged} tokens), so "
                    "dense heads read every page; lower budget_tokens or give a longer prompt to see it select"]
        return []

    def make_layer_cache(self, layer: int, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                         capacity: int) -> LayerCache:
        return LServeLayerCache(config, dtype, device, capacity, self.sink, self.local, self.page, self.physical,
                                self.budget_tokens, self.probe)

    def on_cache_built(self, cache: KVCache) -> None:
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, LServeLayerCache):
                raise SpecError(f"lserve keeps its own two-tier form, but a later cache policy replaced layer {i}'s "
                                f"storage with {type(layer).__name__}; use lserve alone or last in the chain")

    def on_prefill_end(self, cache: KVCache) -> None:
        layers = cache.layers
        mass = torch.stack([layer.local_mass for layer in layers])  # [layers, kv_heads]
        n = round(self.streaming * mass.numel())
        chosen = torch.zeros(mass.numel(), dtype=torch.bool)
        chosen[mass.flatten().topk(n).indices] = True
        for layer, streaming in zip(layers, chosen.view_as(mass)):
            layer.compress(streaming)
