"""ShadowKV: low-rank pre-RoPE keys and landmarks in the fast tier, values off it, selected chunks fetched per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.base import CachePolicy, KVCache, LayerCache
from workbench.cache.dense import DenseLayerCache
from workbench.cache.offload import HostTier, TwoTierLayerCache
from workbench.errors import SpecError
from workbench.models.config import ModelConfig
from workbench.registry import param, register


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE in Hugging Face's half layout [RoFormer, arXiv 2104.09864, eq. 34] at arbitrary `positions`, or its
    inverse (the rotation by minus the angle). x: [..., n, dim] float32; positions: broadcastable to [..., n]."""
    angles = positions[..., None].double() * inv_freq.double()  # [..., n, dim / 2]
    cos, sin = angles.cos().float(), angles.sin().float()
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos - rotated * sin if inverse else x * cos + rotated * sin


class ShadowKVLayerCache(TwoTierLayerCache):
    """One layer in two tiers. Before `compress` every token is dense in `tail`; after it:

    - fast tier: `u` [n, rank] and `w` [rank, kv_heads * dim], the prompt's pre-RoPE keys as u @ w (a truncated
      SVD over the layer's heads together); `landmarks` [kv_heads, chunks, dim], each chunk's mean post-RoPE key;
      `outlier_k`, `outlier_v` [kv_heads, outliers * chunk, dim], the exact keys and values of the chunks whose
      keys their landmark summarises worst (`outlier` [kv_heads, chunks] bool marks them); `tail`, a dense cache
      of the prompt's last tokens (the local window) and every token generated since;
    - off tier: `host_v` [kv_heads, n, dim], every prompt token's value (HostTier).
    The n = `n_prefix` prompt tokens sit at positions prefix_start .. prefix_start + n - 1, before the tail's."""

    name, held_as = "shadowkv", "in its low-rank form"

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, capacity: int,
                 rank: int, chunk: int, budget_tokens: int, outliers: int, local: int):
        self.tail = DenseLayerCache(config.num_kv_heads, config.head_dim, dtype, device, capacity)
        self.kv_heads, self.head_dim = config.num_kv_heads, config.head_dim
        from workbench.models.llama import rope_inv_freq  # here: workbench.models.llama imports the cache package

        self.inv_freq = rope_inv_freq(config).float()
        self.rank, self.chunk, self.budget_tokens = rank, chunk, budget_tokens
        self.n_outliers, self.local = outliers, local
        self.tier = HostTier(device)
        self.n_prefix, self.prefix_start = 0, 0
        self.u = self.w = self.landmarks = self.outlier = self.outlier_k = self.outlier_v = self.host_v = None
        self.n_committed = 0

    # -- the two tiers ------------------------------------------------------------------------------------------
    def compress(self) -> None:
        """Move the committed prompt, but its last `local` tokens, into the two-tier form (whole chunks only)."""
        n = (self.tail.n_committed - self.local) // self.chunk * self.chunk
        if self.n_prefix or n < self.chunk:
            return
        pos = self.tail.positions[0, :n]
        if not torch.equal(pos, pos[0] + torch.arange(n, device=pos.device)) or \
                not (self.tail.positions[:, :n] == pos).all():
            raise SpecError("shadowkv compresses a prompt held whole in every head; put it first in the cache chain, "
                            "before any policy that evicts prompt tokens")
        k, v = (t[:, :n].float() for t in self.tail.view())  # [kv_heads, n, dim]
        dtype = self.tail.k.dtype
        pre = rotate(k, pos.cpu().to(k.device), self.inv_freq.to(k.device), inverse=True)  # keys before RoPE
        flat = pre.transpose(0, 1).reshape(n, -1)  # [n, kv_heads * dim]: one SVD per layer, heads together
        left, sv, right = torch.linalg.svd(flat, full_matrices=False)
        rank = min(self.rank, sv.shape[0])
        self.u = (left[:, :rank] * sv[:rank]).to(dtype)
        self.w = right[:rank].to(dtype)
        chunks = k.view(self.kv_heads, n // self.chunk, self.chunk, -1)
        self.landmarks = chunks.mean(2).to(dtype)
        # outlier chunks: lowest mean cosine similarity between the chunk's keys and its landmark
        similarity = torch.cosine_similarity(chunks, chunks.mean(2, keepdim=True), dim=-1).mean(-1)
        n_out = min(self.n_outliers, chunks.shape[1] - 1)
        worst = similarity.topk(n_out, dim=-1, largest=False).indices.sort(-1).values  # [kv_heads, n_out]
        self.outlier = torch.zeros(self.kv_heads, chunks.shape[1], dtype=torch.bool, device=k.device)
        self.outlier.scatter_(1, worst, True)
        tokens = (worst[..., None] * self.chunk + torch.arange(self.chunk, device=k.device)).flatten(1)
        self.outlier_k = k.gather(1, tokens[..., None].expand(-1, -1, k.shape[2])).to(dtype)
        self.outlier_v = v.gather(1, tokens[..., None].expand(-1, -1, v.shape[2])).to(dtype)
        self.host_v = self.tier.put(self.tail.v[:, :n])
        self.n_prefix, self.prefix_start = n, int(pos[0])
        self.tail.keep(torch.arange(n, self.tail.length))  # the tail gives the moved slots back
        self.tail.n_committed = self.tail.length

    def _fast_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.u, self.w, self.landmarks, self.outlier, self.outlier_k, self.outlier_v)
                if t is not None]

    def _shadow_keys(self, tokens: torch.Tensor) -> torch.Tensor:
        """Keys rebuilt from the low-rank factors, RoPE applied: tokens [kv_heads, ...] -> [kv_heads, ..., dim]."""
        w = self.w.float().view(-1, self.kv_heads, self.head_dim).transpose(0, 1)  # [kv_heads, rank, dim]
        pre = torch.einsum("h...r,hrd->h...d", self.u.float()[tokens], w)
        return rotate(pre, tokens + self.prefix_start, self.inv_freq.to(pre.device))

    # -- attention ----------------------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        heads, n_q, dim = q.shape
        group = heads // self.kv_heads
        qf = q.float().view(self.kv_heads, group, n_q, dim)
        if mask is None:  # a causal prompt with nothing before it
            mask = torch.ones(n_q, n_q, dtype=torch.bool, device=q.device).tril_()
        tail_k, tail_v = (t.float() for t in self.tail.view())
        # each query row picks its own chunks (so a draft tree's rows choose what plain decoding would), per kv head
        # by its group's summed scores against the landmarks; outlier chunks are always attended, never picked
        scores = torch.einsum("hgtd,hcd->htc", qf, self.landmarks.float())
        scores.masked_fill_(self.outlier[:, None], float("-inf"))
        picks = min(max(self.budget_tokens // self.chunk, 1), int((~self.outlier[0]).sum()))
        chosen = scores.topk(picks, dim=-1).indices  # [kv_heads, T, picks]
        tokens = (chosen[..., None] * self.chunk + torch.arange(self.chunk, device=q.device)).flatten(2)
        keys = self._shadow_keys(tokens)  # [kv_heads, T, picks * chunk, dim]
        values = self.tier.fetch(self.host_v, tokens).float()  # only the selected chunks come back
        n_fixed = self.outlier_k.shape[1]
        keys = torch.cat([keys, *(t.float()[:, None].expand(-1, n_q, -1, -1) for t in (self.outlier_k, tail_k))], 2)
        values = torch.cat([values, *(t.float()[:, None].expand(-1, n_q, -1, -1) for t in (self.outlier_v, tail_v))],
                           2)
        visible = torch.cat([mask.new_ones(n_q, tokens.shape[2] + n_fixed), mask[:, self.n_prefix:]], 1)
        return _softmax_attend(qf, keys, values, visible[None, None]).reshape(heads, n_q, dim).to(q.dtype)

    # -- the LayerCache contract --------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        self.tail.append(k, v, positions)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held token dense (keys rebuilt, values read from the off tier, not counted as traffic): for
        inspection only; attention never calls it."""
        if not self.n_prefix:
            return self.tail.view()
        tokens = torch.arange(self.n_prefix, device=self.u.device).expand(self.kv_heads, -1)
        k = self._shadow_keys(tokens)
        out = self.outlier.repeat_interleave(self.chunk, 1)
        k[out] = self.outlier_k.float().flatten(0, 1)
        tail_k, tail_v = self.tail.view()
        return (torch.cat([k.to(tail_k.dtype), tail_k], 1),
                torch.cat([self.host_v.to(tail_v.device), tail_v], 1))








    def nbytes(self) -> int:
        return self.tail.nbytes() + sum(t.numel() * t.element_size() for t in self._fast_tensors())

    def nbytes_per_head(self) -> torch.Tensor:
        return torch.full((self.kv_heads,), self.nbytes() // self.kv_heads, dtype=torch.long)

    def head_stats(self) -> tuple[list[int], list[int], list[int], list[float]]:
        per_head = self.nbytes() // self.kv_heads
        data = per_head - self.tail.length * self.tail.pos.element_size()
        return [self.length] * self.kv_heads, [per_head] * self.kv_heads, [data] * self.kv_heads, [1.0] * self.kv_heads




def _softmax_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [kv_heads, group, T, dim]; k, v [kv_heads, T or 1, S, dim]; mask broadcastable to [kv_heads, group, T, S]
    (True = may attend). Returns [kv_heads, group, T, dim] float32."""
    scores = torch.einsum("hgtd,htsd->hgts", q, k.expand(-1, q.shape[2], -1, -1)) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("hgts,htsd->hgtd", probs, v.expand(-1, q.shape[2], -1, -1))


@register("cache", "shadowkv", lossless=False)
@dataclass
class ShadowKVPolicy(CachePolicy):
    """ShadowKV: the prompt's keys as a low-rank projection taken before RoPE, its values off the fast tier.

    "ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference" (arXiv 2410.21465). After the
    prefill, each layer's prompt keys are un-rotated (RoPE inverted at their positions) and factored by a
    truncated SVD (u [n, rank] @ w [rank, kv_heads * dim]); the values move to the off tier (a separate host
    buffer, workbench/cache/offload.py). The fast tier keeps the factors, one landmark per chunk of `chunk`
    tokens (the mean of its post-RoPE keys), the exact keys and values of the `outliers` chunks per head whose
    keys their landmark summarises worst, and a dense tail (the prompt's last `local` tokens and every generated
    token). Each decoding query scores the landmarks, picks `budget_tokens` tokens' worth of chunks per kv head,
    rebuilds their keys from the factors (RoPE re-applied) and fetches only their values from the off tier
    (bytes and time counted: `cache_moved_bytes`, `cache_moved_s`); attention is exact over those, the outliers
    and the tail. Left out: the paper's CUDA kernels overlapping the fetch with the key rebuild, and its
    prefill-time accuracy check of the landmarks; on a CPU both tiers are host memory, so the fetch is a real
    copy between two host buffers, not a PCIe transfer. Lossy.
    """

    rank: int = param(48, "rank of the pre-RoPE key factors (per layer, all kv heads together)", min=1, max=4096)
    chunk: int = param(8, "tokens per chunk: the unit of selection, one landmark each", min=1, max=256)
    budget_tokens: int = param(256, "prompt tokens each decoding query attends to per kv head (whole chunks)", min=1,
                        max=1 << 20)
    outliers: int = param(4, "chunks per kv head kept exact in the fast tier (the landmarks' worst fits)",
                          min=0, max=4096)
    local: int = param(32, "most recent prompt tokens kept dense in the fast tier", min=0, max=1 << 16)

    def warnings(self, prompt_tokens: int, new_tokens: int) -> list[str]:
        shadow = (prompt_tokens - 1 - self.local) // self.chunk * self.chunk  # the prompt's last token is pending
        if shadow < self.chunk:
            return [f"shadowkv: the prompt ({prompt_tokens} tokens) is within the local window (local={self.local}) "
                    "plus one chunk, so nothing moves to the off tier; give a longer prompt or lower local"]
        if self.budget_tokens + self.outliers * self.chunk >= shadow:
            return [f"shadowkv: budget_tokens={self.budget_tokens} and {self.outliers} outlier chunks cover the whole "
                    f"compressed prompt ({shadow} tokens), so every chunk is attended (keys still low-rank); "
                    "lower budget_tokens or give a longer prompt to see it select"]
        return []

    def make_layer_cache(self, layer: int, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                         capacity: int) -> LayerCache:
        return ShadowKVLayerCache(config, dtype, device, capacity, self.rank, self.chunk, self.budget_tokens,
                                  self.outliers, self.local)

    def on_cache_built(self, cache: KVCache) -> None:
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, ShadowKVLayerCache):
                raise SpecError(f"shadowkv keeps its own two-tier form, but a later cache policy replaced layer {i}'s "
                                f"storage with {type(layer).__name__}; use shadowkv alone or last in the chain")

    def on_prefill_end(self, cache: KVCache) -> None:
        for layer in cache.layers:
            layer.compress()
