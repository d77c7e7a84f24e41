"""Double Sparsity: outlier channels pick the top-k tokens; exact attention runs over those only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.cache.base import CachePolicy, KVCache, LayerCache
from workbench.cache.dense import DenseLayerCache
from workbench.cache.scores import check_budget, kept_count
from workbench.errors import SpecError
from workbench.models.config import ModelConfig
from workbench.registry import param, register

SPARSE_QUERIES = 64  # forwards of up to this many queries (decode steps, draft trees) attend sparsely
ROW_CHUNK = 8  # query rows gathered at a time: [heads, rows, top-k, dim] stays small


class DoubleSparsityLayerCache(DenseLayerCache):
    """Every token, dense (no bytes saved), plus `channels` [kv_heads, r]: the outlier channels of each kv head.

    attend(): a forward of more than SPARSE_QUERIES queries (the prompt) attends densely, and the first one
    calibrates the channels; after that each query scores every held key on its head's r channels only and
    attends exactly to the top kept_count(held, budget) of them."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, capacity: int,
                 n_channels: int, budget: float):
        super().__init__(kv_heads, head_dim, dtype, device, capacity)
        self.n_channels = n_channels
        self.budget = budget
        self.channels: torch.Tensor | None = None
        self.attends_itself = budget < 1  # at budget 1 every token is attended: the ordinary dense path

    def attend(self, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        k, v = self.view()
        if self.channels is None:
            self.channels = outlier_channels(q, k, self.n_channels)
        top = kept_count(k.shape[1], self.budget)
        if q.shape[1] > SPARSE_QUERIES or top == k.shape[1]:
            return _dense(q, k, v, mask)
        return torch.cat([self._sparse(q[:, i:i + ROW_CHUNK], k, v, None if mask is None else mask[i:i + ROW_CHUNK],
                                       top) for i in range(0, q.shape[1], ROW_CHUNK)], 1)

    def _sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                top: int) -> torch.Tensor:
        """q: [heads, T, dim] -> [heads, T, dim], attending to `top` keys per query head and row."""
        heads, n_q, dim = q.shape
        kv_heads, n_k = k.shape[0], k.shape[1]
        group = heads // kv_heads
        kv_of = torch.arange(heads, device=q.device) // group
        # approximate scores on the outlier channels only: [heads, T, S]
        q_r = q.float().gather(2, self.channels[kv_of][:, None].expand(-1, n_q, -1))
        k_r = k.float().gather(2, self.channels[:, None].expand(-1, n_k, -1))
        approx = (q_r.reshape(kv_heads, group * n_q, -1) @ k_r.transpose(1, 2)).view(heads, n_q, n_k)
        if mask is not None:
            approx.masked_fill_(~mask, float("-inf"))
        chosen = approx.topk(top, dim=-1).indices  # [heads, T, top]
        # exact attention over the chosen keys only
        k_sel = k[kv_of[:, None, None], chosen].float()  # [heads, T, top, dim]
        v_sel = v[kv_of[:, None, None], chosen].float()
        scores = (q.float()[:, :, None] * k_sel).sum(-1) * dim**-0.5
        if mask is not None:
            scores.masked_fill_(~mask[None].expand(heads, -1, -1).gather(2, chosen), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return (probs[..., None] * v_sel).sum(2).to(q.dtype)

    def _index_bytes_per_head(self) -> int:
        return 0 if self.channels is None else self.channels.shape[1] * self.channels.element_size()

    def nbytes(self) -> int:
        return super().nbytes() + self.k.shape[0] * self._index_bytes_per_head()

    def nbytes_per_head(self) -> torch.Tensor:
        dense = DenseLayerCache.nbytes(self) // self.k.shape[0]
        return torch.full((self.k.shape[0],), dense + self._index_bytes_per_head(), dtype=torch.long)


def outlier_channels(q: torch.Tensor, k: torch.Tensor, r: int) -> torch.Tensor:
    """[kv_heads, r] channels with the largest expected |q_c k_c| contribution to the scores.

    q: [heads, T, dim]; k: [kv_heads, S, dim]. Per kv head: mean |q_c| over its query group and the queries,
    times mean |k_c| over the keys."""
    kv_heads, dim = k.shape[0], k.shape[2]
    q_mag = q.float().abs().mean(1).view(kv_heads, -1, dim).sum(1)
    k_mag = k.float().abs().mean(1)
    return (q_mag * k_mag).topk(r, dim=1).indices.sort(dim=1).values


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


@register("cache", "double_sparsity")
@dataclass
class DoubleSparsityPolicy(CachePolicy):
    """Double Sparsity: a few outlier key channels pick the top-k tokens each query attends to exactly.

    "Post-Training Sparse Attention with Double Sparsity" (arXiv 2408.07092). Which channels dominate q·k is
    nearly static per head, so the paper calibrates r outlier channels per head offline; at decode time each
    query computes approximate scores on those r channels only, keeps the top-k tokens, and runs exact
    attention over them. Every token stays stored: this saves attention compute and memory reads (on a
    kernel), not bytes; the bytes reported are the dense cache's plus the channel index. Calibration: this
    version calibrates on the prompt's own prefill (mean |q_c| x mean |k_c| per kv head, over the prompt's
    queries and keys), because a cache policy is handed no tokenizer or model to run the offline calibration
    text through. Left out: offline calibration, the label cache (the r channels of every key stored apart
    for fast reads; gathered from the full keys here) and the offloading variant. Prompts attend densely.
    """

    budget: float = param(0.25, "fraction of held tokens each decoding query attends to (top-k by approximate "
                                "attention); 1 = dense", min=0.0, max=1.0)
    channels: int = param(16, "outlier channels per kv head used for the approximate scores (r)", min=1, max=1024)

    def check(self) -> None:
        check_budget(self.budget)

    def make_layer_cache(self, layer: int, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                         capacity: int) -> LayerCache:
        if self.channels > config.head_dim:
            raise SpecError(f"double_sparsity: channels={self.channels} exceeds this model's head_dim "
                            f"({config.head_dim}); use at most {config.head_dim}")
        return DoubleSparsityLayerCache(config.num_kv_heads, config.head_dim, dtype, device, capacity, self.channels,
                                        self.budget)

    def on_cache_built(self, cache: KVCache) -> None:
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, DoubleSparsityLayerCache):
                raise SpecError(f"double_sparsity computes attention over its own dense store, but a later cache "
                                f"policy replaced layer {i}'s storage with {type(layer).__name__}; put "
                                f"double_sparsity last in the cache chain, after any eviction policy")
