"""Attention over whatever a layer cache holds.

The model calls `attention` once per layer with the new tokens' q, k, v. The layer cache stores k and v
(or, with no cache, the new tokens are the whole context) and the scores are computed against every
token the cache holds plus the new ones. Which tokens the new ones may see among themselves comes from
`new_mask` (a tree mask during verification); every committed token is visible to every new token.
Compressed storage forms (quantized, sparse, selected tokens) plug in through the cache's `view`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from workbench.kernels import cpu as cpu_kernels

if TYPE_CHECKING:
    from workbench.cache.base import LayerCache


# Up to this many new tokens (decode steps, draft trees) use the grouped path below; more use SDPA.
SMALL_QUERY = 64


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    layer_cache: LayerCache | None,
    new_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attend the new tokens' queries to the cache and to themselves.

    q: [T, heads, dim]; k, v: [T, kv_heads, dim]; positions: [T] logical positions of the new tokens.
    new_mask: [T, T] bool (True = may attend) among the new tokens, or None for causal.
    Returns [T, heads * dim].
    """
    n_new, heads, dim = q.shape
    k, v = k.transpose(0, 1), v.transpose(0, 1)
    if layer_cache is not None:
        layer_cache.append(k, v, positions)
        if layer_cache.observer is not None or layer_cache.attends_itself:
            full_mask = _full_mask(new_mask, n_new, layer_cache.length, q.device)
            if layer_cache.observer is not None:
                layer_cache.observer.observe(layer_cache, q.transpose(0, 1), layer_cache.view()[0], full_mask)
            if layer_cache.attends_itself:  # sparse or selected-token forms compute attention themselves
                return layer_cache.attend(q.transpose(0, 1), full_mask).transpose(0, 1).reshape(n_new, -1)
        k, v = layer_cache.view()
    n_past = k.shape[1] - n_new
    if n_new <= SMALL_QUERY and cpu_kernels.attention_fits(q, k, v):
        # the workbench's CPU kernel: a few query rows, grouped kv heads, the cache's strided view as it is
        return cpu_kernels.attention(q, k, v, visible_keys(new_mask, n_new, n_past, q.device))
    if n_new == 1 and new_mask is None:
        # One decoding step: the group of query heads sharing a kv head acts as that head's queries,
        # so one fused call does it with no copies of k and v.
        # (4-D inputs take the fused CPU kernel; 3-D ones fall back to the unfused math path.)
        out = F.scaled_dot_product_attention(q.view(1, k.shape[0], heads // k.shape[0], dim), k[None], v[None])
        return out.reshape(1, heads * dim)
    q = q.transpose(0, 1)
    if n_new <= SMALL_QUERY:
        out = _grouped_sdpa(q, k, v, visible_keys(new_mask, n_new, n_past, q.device, heads // k.shape[0], q.dtype))
    else:  # long queries (prefill): the fused kernel, which never materialises all the scores
        plain_causal = new_mask is None and n_past == 0  # a prompt with nothing cached before it
        if new_mask is None:
            new_mask = torch.ones(n_new, n_new, dtype=torch.bool, device=q.device).tril_()
        mask = F.pad(new_mask, (n_past, 0), value=True) if n_past else new_mask
        group = q.shape[0] // k.shape[0]
        if group > 1:
            k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if plain_causal else mask,
                                             is_causal=plain_causal)
    return out.transpose(0, 1).reshape(n_new, -1)


# The masks `visible_keys` built last, with what they were built from: every layer of a forward asks for the
# same one (30 times per draft verification), and building it costs more than the attention it masks.
_last_masks: tuple = (None, None, {})


def visible_keys(new_mask: torch.Tensor | None, n_new: int, n_past: int, device: torch.device,
                 group: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Which keys each new token sees: [T, S] bool over `n_past` earlier keys (all visible) and the new ones
    (new_mask; None is causal), or None when every key is visible. With `group`, the additive mask
    [1, 1, group * T, S] in `dtype` that `_grouped_sdpa` takes."""
    global _last_masks
    key = (n_new, n_past, device)
    last = _last_masks  # read once: another thread (the app's side-by-side runs) may replace it meanwhile
    if last[0] is new_mask and last[1] == key:  # `is`: the memo holds the tensor, so its id is not reused
        forms = last[2]
    else:
        forms = {}
        _last_masks = (new_mask, key, forms)
    if (group, dtype) not in forms:
        if group is None:
            mask = new_mask
            if mask is None and n_new > 1:
                mask = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril_()
            forms[(group, dtype)] = None if mask is None else F.pad(mask, (n_past, 0), value=True) if n_past else mask
        else:
            mask = visible_keys(new_mask, n_new, n_past, device)
            if mask is not None:
                mask = _group_rows(mask, group)
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
            forms[(group, dtype)] = mask
    return forms[(group, dtype)]


def _full_mask(new_mask: torch.Tensor | None, n_new: int, length: int, device: torch.device) -> torch.Tensor | None:
    """[T, S] mask of the new tokens over every key held (None: a causal prompt with nothing before it)."""
    n_past = length - n_new
    if new_mask is None:
        if n_past == 0 and n_new > 1:
            return None
        new_mask = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril_()
    return F.pad(new_mask, (n_past, 0), value=True) if n_past else new_mask


def _group_rows(mask: torch.Tensor, group: int) -> torch.Tensor:
    """[T, S] mask -> [1, 1, group * T, S]: the rows of one kv head's group of query heads (see below)."""
    return mask.repeat(group, 1)[None, None]


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """Softmax attention for a few queries (a draft tree, a short chunk) with grouped kv heads, without
    copying k and v per query head.

    q: [heads, T, dim]; k, v: [kv_heads, S, dim]; mask: [T, S] bool or None. Returns [heads, T, dim].
    """
    return _grouped_sdpa(q, k, v, None if mask is None else _group_rows(mask, q.shape[0] // k.shape[0]))


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """`_grouped_attention` with the mask already expanded by `_group_rows` (bool, or additive in q's dtype).

    Query heads g * group .. (g + 1) * group - 1 share kv head g, as in transformers' repeat_kv: each kv
    head's group of query heads becomes group * T query rows of one fused SDPA call (4-D, so the CPU takes
    its fused kernel, faster than float32 batched products), the [T, S] mask repeated per head.
    """
    heads, n, dim = q.shape
    kv_heads = k.shape[0]
    rows = q.reshape(1, kv_heads, heads // kv_heads * n, dim)
    out = F.scaled_dot_product_attention(rows, k[None], v[None], attn_mask=mask)  # [1, kv_heads, group*T, dim]
    return out.reshape(heads, n, dim)  # the CUDA kernels may return a strided layout
