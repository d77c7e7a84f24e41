"""Double Sparsity: offline-calibrated outlier channels pick the top-k tokens; exact attention runs over those."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from workbench.cache.base import CachePolicy, KVCache, LayerCache
from workbench.cache.dense import DenseLayerCache
from workbench.cache.scores import check_budget, kept_count
from workbench.errors import SpecError
from workbench.models.config import ModelConfig
from workbench.registry import param, register
from workbench.text import calibration_text, text_hash

if TYPE_CHECKING:
    from workbench.models.llama import LlamaModel

SPARSE_QUERIES = 64  # forwards of up to this many queries (decode steps, draft trees) attend sparsely
ROW_CHUNK = 8  # query rows gathered at a time: [heads, rows, top-k, dim] stays small
# Offline calibration: the paper's script runs 256 blocks of 512 Pile tokens on a GPU; the ranking of a
# head's few outlier channels settles on far fewer, and this runs once per loaded model on a CPU.
CALIBRATION_TOKENS = 1024
CALIBRATION_BLOCK = 512  # tokens per forward, each from position 0 (the paper's block size)
CHARS_PER_TOKEN = 8  # text tokenized for CALIBRATION_TOKENS tokens: a margin over English's ~4 chars a token
MEMORY_KEY = "double_sparsity:channel_importance"  # per-model memory: (importance [layers, kv_heads, dim], source)


class DoubleSparsityLayerCache(DenseLayerCache):
    """Every token, dense (no bytes saved), plus `channels` [kv_heads, r]: the outlier channels of each kv head.

    `channels` comes calibrated offline (DoubleSparsityPolicy.prepare), or is None and then calibrated on the
    first forward (calibration=prompt). attend(): a prompt (no mask, or more than SPARSE_QUERIES queries)
    attends densely; a decoding query or draft tree scores every held key on its head's r channels only and
    attends exactly to the top kept_count(n, budget) of the n keys that query may see."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, capacity: int,
                 n_channels: int, budget: float, channels: torch.Tensor | None = None):
        super().__init__(kv_heads, head_dim, dtype, device, capacity)
        self.n_channels = n_channels
        self.budget = budget
        self.channels = channels
        self.attends_itself = budget < 1  # at budget 1 every token is attended: the ordinary dense path

    def attend(self, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        k, v = self.view()
        if self.channels is None:
            self.channels = outlier_channels(q, k, self.n_channels)
        # mask None is a causal prompt with nothing before it: dense, as the paper's prefill
        if mask is None or q.shape[1] > SPARSE_QUERIES:
            return _dense(q, k, v, mask)
        # each row keeps kept_count of the keys it may see, as that query would decoding alone: a draft tree's
        # rows choose what plain decoding would, so lossless drafters stay lossless under this policy
        # (kept_count as tensor operations, so a GPU cache is not synchronised once per layer)
        visible = mask.sum(-1, dtype=torch.float64)
        tops = torch.minimum(visible, (self.budget * visible - 1e-9).ceil().clamp_min(1)).long()
        return torch.cat([self._sparse(q[:, i:i + ROW_CHUNK], k, v, mask[i:i + ROW_CHUNK], tops[i:i + ROW_CHUNK])
                          for i in range(0, q.shape[1], ROW_CHUNK)], 1)

    def _sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                tops: torch.Tensor) -> torch.Tensor:
        """q: [heads, T, dim]; mask: [T, S]; tops: [T] -> [heads, T, dim], row t attending to tops[t] keys per
        query head."""
        heads, n_q, dim = q.shape
        kv_heads, n_k = k.shape[0], k.shape[1]
        group = heads // kv_heads
        kv_of = torch.arange(heads, device=q.device) // group
        # approximate scores on the outlier channels only: [heads, T, S]
        q_r = q.float().gather(2, self.channels[kv_of][:, None].expand(-1, n_q, -1))
        k_r = k.float().gather(2, self.channels[:, None].expand(-1, n_k, -1))
        approx = (q_r.reshape(kv_heads, group * n_q, -1) @ k_r.transpose(1, 2)).view(heads, n_q, n_k)
        approx.masked_fill_(~mask, float("-inf"))
        most = kept_count(n_k, self.budget)  # no row sees more than all n_k keys
        chosen = approx.topk(most, dim=-1).indices  # [heads, T, most], best first
        beyond = torch.arange(most, device=q.device) >= tops[:, None]  # past each row's own count
        # exact attention over the chosen keys only
        k_sel = k[kv_of[:, None, None], chosen].float()  # [heads, T, top, dim]
        v_sel = v[kv_of[:, None, None], chosen].float()
        scores = (q.float()[:, :, None] * k_sel).sum(-1) * dim**-0.5
        scores.masked_fill_(~mask[None].expand(heads, -1, -1).gather(2, chosen) | beyond, float("-inf"))
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
    """calibration=prompt: [kv_heads, r] channels with the largest expected |q_c k_c| over one forward.

    q: [heads, T, dim]; k: [kv_heads, S, dim]. Per kv head: mean |q_c| over its query group and the queries,
    times mean |k_c| over the keys."""
    kv_heads, dim = k.shape[0], k.shape[2]
    q_mag = q.float().abs().mean(1).view(kv_heads, -1, dim).sum(1)
    k_mag = k.float().abs().mean(1)
    return top_channels(q_mag * k_mag, r)


def top_channels(importance: torch.Tensor, r: int) -> torch.Tensor:
    """[..., dim] channel importance -> [..., r] indices of the r largest, ascending."""
    return importance.topk(r, dim=-1).indices.sort(dim=-1).values


class ChannelImportance:
    """An attention observer for the offline calibration: per kv head and channel c, the mean over calibration
    tokens t of |q_t,c k_t,c| (each token's query with its own key, after RoPE), summed over the query heads
    of the kv head's group. This is the statistic the paper's calibration script ranks channels by."""

    def __init__(self, kv_heads: int, dim: int):
        self.total = torch.zeros(kv_heads, dim, dtype=torch.float64)
        self.tokens = 0

    def observe(self, cache: LayerCache, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        kv_heads, n, dim = k.shape[0], q.shape[1], k.shape[2]
        own = k[:, -n:].float()  # the new tokens' keys, in the new tokens' order
        products = q.float().view(kv_heads, -1, n, dim).mul(own[:, None]).abs()  # [kv_heads, group, T, dim]
        self.total += products.sum((1, 2)).double().cpu()
        self.tokens += n

    def commit(self, offsets: list[int]) -> None:
        pass

    def mean(self) -> torch.Tensor:
        return (self.total / max(self.tokens, 1)).float()


def calibration_ids(model: LlamaModel, tokenizer: Any) -> tuple[torch.Tensor, str]:
    """[n] token ids to calibrate on, and where they came from: the first CALIBRATION_TOKENS tokens of
    `calibration_text()` (never the evaluation text), or, for a model without a tokenizer (tiny random
    test models), a fixed seeded random sequence of as many ids."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (CALIBRATION_TOKENS,), generator=g)
        return ids, f"{CALIBRATION_TOKENS} seeded random token ids (the model has no tokenizer)"
    text = calibration_text()
    ids = tokenizer(text[:CALIBRATION_TOKENS * CHARS_PER_TOKEN])["input_ids"][:CALIBRATION_TOKENS]
    return torch.tensor(ids, dtype=torch.long), f"the first {len(ids)} tokens of calibration_text() " \
                                                 f"(hash {text_hash(text)})"


def calibrate(model: LlamaModel, tokenizer: Any) -> tuple[torch.Tensor, str]:
    """Offline calibration: run the calibration ids through the model in blocks of CALIBRATION_BLOCK tokens
    (each from position 0 with an empty dense cache) and return the channel importance [layers, kv_heads,
    dim] (ChannelImportance.mean, float32, CPU) with a description of the ids used."""
    config = model.config
    ids, source = calibration_ids(model, tokenizer)
    block = min(CALIBRATION_BLOCK, config.context_window)
    observers = [ChannelImportance(config.num_kv_heads, config.head_dim) for _ in range(config.num_layers)]
    with torch.inference_mode():
        for start in range(0, len(ids), block):
            chunk = ids[start:start + block].to(model.device)
            cache = KVCache([DenseLayerCache(config.num_kv_heads, config.head_dim, model.dtype, model.device,
                                             len(chunk)) for _ in range(config.num_layers)])
            for layer, observer in zip(cache.layers, observers):
                layer.observer = observer
            model(chunk, torch.arange(len(chunk), device=model.device), cache, last_only=True)
    return torch.stack([o.mean() for o in observers]), source


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


@register("cache", "double_sparsity", lossless=False)
@dataclass
class DoubleSparsityPolicy(CachePolicy):
    """Double Sparsity: a few outlier key channels pick the top-k tokens each query attends to exactly.

    "Post-Training Sparse Attention with Double Sparsity" (arXiv 2408.07092). Which channels dominate q·k is
    nearly static per head, so the paper calibrates r outlier channels per head offline; at decode time each
    query computes approximate scores on those r channels only, keeps the top-k tokens, and runs exact
    attention over them. Every token stays stored: this saves attention compute and memory reads (on a
    kernel), not bytes; the bytes reported are the dense cache's plus the channel index.

    Calibration (`calibration=offline`, the paper's): in `prepare`, once per loaded model (kept in the run's
    per-model memory), CALIBRATION_TOKENS tokens of `calibration_text()` (separate from the evaluation text)
    run through the model; each layer's observer takes, post-RoPE as in the paper's script, the mean over
    tokens of |q_t,c k_t,c| (a token's query with its own key) per channel, and the top `channels` per kv head
    are kept. The paper ranks per query head; here a kv head's group of query heads is summed (GQA), since
    they share the keys whose channels are read. A model without a tokenizer (tiny random test models)
    calibrates on a seeded random token sequence instead (`calibrated_on` says which). `calibration=prompt`
    is the earlier stand-in: mean |q_c| x mean |k_c| over each run's own prefill (also what a cache built
    without `prepare`, by `build_cache` alone, falls back to). Left out: the label cache
    (the r channels of every key stored apart for fast reads; gathered from the full keys here) and the
    offloading variant. Prompts attend densely.
    """

    budget: float = param(0.25, "fraction of held tokens each decoding query attends to (top-k by approximate "
                                "attention); 1 = dense", min=0.0, max=1.0)
    channels: int = param(16, "outlier channels per kv head used for the approximate scores (r)", min=1, max=1024)
    calibration: str = param("offline", "where the outlier channels come from: offline = the paper's calibration "
                                        "on calibration_text(), once per loaded model; prompt = each run's own "
                                        "prefill", choices=["offline", "prompt"])
    importance: torch.Tensor | None = field(default=None, init=False, repr=False)  # [layers, kv_heads, dim]
    calibrated_on: str = field(default="", init=False)  # what the offline calibration ran on

    def check(self) -> None:
        check_budget(self.budget)

    def prepare(self, model: LlamaModel, tokenizer: Any, memory: dict) -> None:
        if self.calibration == "prompt":
            return
        if MEMORY_KEY not in memory:  # once per loaded model; every `channels` value reads the same ranking
            memory[MEMORY_KEY] = calibrate(model, tokenizer)
        self.importance, self.calibrated_on = memory[MEMORY_KEY]

    def make_layer_cache(self, layer: int, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                         capacity: int) -> LayerCache:
        if self.channels > config.head_dim:
            raise SpecError(f"double_sparsity: channels={self.channels} exceeds this model's head_dim "
                            f"({config.head_dim}); use at most {config.head_dim}")
        # None: calibrated on the first forward (calibration=prompt, or a cache built without `prepare`)
        channels = None if self.importance is None else top_channels(self.importance[layer], self.channels).to(device)
        return DoubleSparsityLayerCache(config.num_kv_heads, config.head_dim, dtype, device, capacity, self.channels,
                                        self.budget, channels)

    def on_cache_built(self, cache: KVCache) -> None:
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, DoubleSparsityLayerCache):
                raise SpecError(f"double_sparsity computes attention over its own dense store, but a later cache "
                                f"policy replaced layer {i}'s storage with {type(layer).__name__}; put "
                                f"double_sparsity last in the cache chain, after any eviction policy")
