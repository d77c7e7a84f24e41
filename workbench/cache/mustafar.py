"""Mustafar: per-token magnitude pruning of K and V, bitmap-compressed, with attention over the sparse form."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.quantized import (
    RAW_HEADS_HELP,
    SKIP_LAYERS_HELP,
    Codec,
    CompressedLayerCache,
    CompressedPolicy,
    pack_bits,
    unpack_bits,
)
from workbench.errors import SpecError
from workbench.models.config import ModelConfig
from workbench.registry import param, register


class MustafarCodec(Codec):
    """Each token keeps its `kept` largest-magnitude channels of K and of V: a bitmap of dim bits and the
    nonzeros packed in channel order, in the model's dtype."""

    group = 1
    attention_operation = "mustafar_attention"  # kernels/triton_mustafar.py reads this layout

    def __init__(self, head_dim: int, sparsity: float, dtype: torch.dtype):
        self.head_dim, self.dtype = head_dim, dtype
        self.kept = max(1, head_dim - round(head_dim * sparsity))

    def _prune(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1, 2)  # [kv_heads, tokens, dim]
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask.scatter_(-1, x.abs().topk(self.kept, dim=-1).indices, True)
        values = x[mask].view(*x.shape[:2], self.kept)  # boolean indexing keeps channel order
        return pack_bits(mask, 1), values.to(self.dtype)

    def encode(self, k, v):
        kb, kv_ = self._prune(k)
        vb, vv = self._prune(v)
        return {"k_bitmap": kb, "k_values": kv_, "v_bitmap": vb, "v_values": vv}, {}

    def channels(self, bitmap: torch.Tensor) -> torch.Tensor:
        """Channel index of each packed nonzero, [kv_heads, n, kept] (the bitmap expanded once per call)."""
        mask = unpack_bits(bitmap, 1).bool()
        return mask.nonzero()[:, -1].view(*bitmap.shape[:2], self.kept)

    def decode(self, tok, grp):
        out = []
        for name in ("k", "v"):
            bitmap, values = tok[f"{name}_bitmap"], tok[f"{name}_values"]
            dense = torch.zeros(*bitmap.shape[:2], self.head_dim, device=values.device)
            out.append(dense.scatter_(-1, self.channels(bitmap), values.float()))
        return out[0], out[1]

    def held_fraction(self) -> float:
        return self.kept / self.head_dim


class MustafarLayerCache(CompressedLayerCache):
    """Attention straight from the bitmap form: scores q·k as gathered products over each key's nonzeros,
    and the output as a scatter-add of probability-weighted value nonzeros. This is the torch reference of
    the paper's SpMV kernel; a one-token step takes the Triton kernel instead where it runs (its codec's
    `attention_operation`, kernels/triton_mustafar.py)."""

    attends_itself = True

    def _flush(self) -> None:
        """The paper's dense window slides: after every commit exactly the `residual` most recent committed
        tokens stay dense and every older one is pruned (its reference code prunes the token leaving the window
        at each step). KIVI's flush, the shared default, would prune the whole window once full and so leave
        only 0 to residual - 1 recent tokens dense."""
        if self.raw.n_committed > self.residual:
            self._encode_oldest(self.raw.n_committed - self.residual)  # the codec's group is one token

    def _sparse_scores(self, q: torch.Tensor) -> torch.Tensor:
        """q: [kv_heads, rows, dim] -> scores [kv_heads, rows, N] over the compressed keys."""
        idx = self.codec.channels(self.tok["k_bitmap"])  # [kv_heads, N, kept]
        vals = self.tok["k_values"].float()
        h, n, kept = idx.shape
        rows = q.shape[1]
        gathered = q.gather(2, idx.reshape(h, 1, n * kept).expand(-1, rows, -1)).view(h, rows, n, kept)
        return (gathered * vals[:, None]).sum(-1)

    def _sparse_output(self, probs: torch.Tensor) -> torch.Tensor:
        """probs: [kv_heads, rows, N] -> [kv_heads, rows, dim], sum of p * v over the value nonzeros."""
        idx = self.codec.channels(self.tok["v_bitmap"])
        vals = self.tok["v_values"].float()
        h, n, kept = idx.shape
        contrib = probs[..., None] * vals[:, None]  # [kv_heads, rows, N, kept]
        out = torch.zeros(h, probs.shape[1], self.head_dim, device=probs.device)
        index = idx.reshape(h, 1, n * kept).expand(-1, probs.shape[1], -1)
        return out.scatter_add_(2, index, contrib.reshape(h, probs.shape[1], n * kept))

    def _compressed_scores(self, qg: torch.Tensor) -> torch.Tensor:
        """Scores over the compressed slots: sparse for the coded heads, dense for the raw heads (raw_heads)."""
        full = qg[self.full_heads] @ self.full["k"].float().transpose(1, 2) if self.n_full else None
        return self.merge(self._sparse_scores(self.coded(qg)) if self.n_coded else None, full)

    def _compressed_output(self, probs: torch.Tensor) -> torch.Tensor:
        full = probs[self.full_heads] @ self.full["v"].float() if self.n_full else None
        return self.merge(self._sparse_output(self.coded(probs)) if self.n_coded else None, full)

    def attend(self, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        heads, t, dim = q.shape
        group = heads // self.kv_heads
        n_c = self.n_compressed
        qg = (q.float() * dim**-0.5).reshape(self.kv_heads, group * t, dim)
        rk, rv = self.raw.view()
        scores = torch.cat([self._compressed_scores(qg) if n_c else qg.new_empty(self.kv_heads, group * t, 0),
                            qg @ rk.float().transpose(1, 2)], dim=-1)
        if mask is None:  # a causal prompt with nothing before it
            mask = torch.ones(t, self.length, dtype=torch.bool, device=q.device).tril_(self.length - t)
        scores = scores.view(self.kv_heads, group, t, -1).masked_fill(~mask, float("-inf")).view_as(scores)
        probs = torch.softmax(scores, dim=-1)
        out = probs[..., n_c:] @ rv.float()
        if n_c:
            out = out + self._compressed_output(probs[..., :n_c])
        return out.view(heads, t, dim).to(q.dtype)


@register("cache", "mustafar", lossless=False)
@dataclass
class MustafarPolicy(CompressedPolicy):
    """Mustafar: unstructured sparsity for the KV cache.

    "Mustafar: Promoting Unstructured Sparsity for KV Cache Pruning in LLM Inference" (arXiv 2505.22913).
    Each token's key (after RoPE, as cached) and value vector is pruned per kv head by magnitude over its
    head_dim channels: the round(sparsity * head_dim) smallest |x| are dropped (the paper finds per-token
    magnitude as good as output-aware scores for both K and V). What is left is stored as a bitmap plus the
    packed nonzeros, and attention is computed over that form (SpMV for q·K and for P·V). As in the paper's
    reference code, a dense window slides: the `residual` most recent committed tokens stay dense and each
    token is pruned as it leaves the window; the prompt attends to itself densely at prefill and is then
    pruned except its last `residual` tokens; no sink tokens are kept; drafts stay dense until accepted.
    The window defaults to 256 tokens, not the 32 of the paper's accuracy scripts: its kernel path prunes 256
    tokens at a time and so holds 32 to 288 dense, and on SmolLM2-135M (head_dim 64, half the paper's models')
    a 32-token window costs several times the perplexity of a 256-token one for a few percent fewer bytes
    (docs/cache.md has the figures).
    A one-token step's attention runs in a Triton kernel reading the bitmaps on CUDA (kernels/triton_mustafar.py);
    elsewhere, and for trees and raw heads, in this torch reference (it expands each bitmap to indices per call,
    so it is slow). Left out: the tiling of the bitmap format, and the kernel path's batching of compression 256
    tokens at a time. The reference's threshold (kthvalue, keep >=) keeps one channel more than
    (1 - sparsity) * head_dim; here exactly head_dim - round(sparsity * head_dim) are kept, so the stated sparsity
    is the real one.
    """

    sparsity: float = param(0.5, "fraction of each token's K and V channels pruned", min=0.0, max=0.99)
    residual: int = param(256, "most recent committed tokens kept dense (the paper's scripts: 32)", min=0,
                          max=1 << 20)
    skip_layers: str = param("", SKIP_LAYERS_HELP)
    raw_heads: str = param("", RAW_HEADS_HELP)
    layer_cache_class = MustafarLayerCache

    def codec(self, layer: int, config: ModelConfig, dtype: torch.dtype) -> Codec:
        if config.head_dim % 8:
            raise SpecError(f"mustafar: the bitmap needs head_dim divisible by 8, the model has {config.head_dim}")
        return MustafarCodec(config.head_dim, self.sparsity, dtype)

