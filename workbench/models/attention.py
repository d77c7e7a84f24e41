"""Attention over whatever a layer cache holds.

The model calls `attention` once per layer with the new tokens' q, k, v. The layer cache stores k and v
(or, with no cache, the new tokens are the whole context) and the scores are computed against every
token the cache holds plus the new ones. Which tokens the new ones may see among themselves comes from
`new_mask` (a tree mask during verification); every committed token is visible to every new token.
Compressed storage forms (quantized, sparse, selected tokens) plug in through the cache's `view`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.cache.base import LayerCache


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    layer_cache: LayerCache | None,
    new_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attend the new tokens' queries to the cache and to themselves.

    q: [heads, T, dim]; k, v: [kv_heads, T, dim]; positions: [T] logical positions of the new tokens.
    new_mask: [T, T] bool (True = may attend) among the new tokens, or None for causal.
    Returns [T, heads * dim].
    """
    n_new = q.shape[1]
    if layer_cache is not None:
        layer_cache.append(k, v, positions)
        k, v = layer_cache.view()
    n_past = k.shape[1] - n_new
    if n_new == 1 and new_mask is None:
        mask = None  # one query sees everything: no mask to build
    elif n_past == 0 and new_mask is None:
        mask = None
    else:
        if new_mask is None:
            new_mask = torch.ones(n_new, n_new, dtype=torch.bool, device=q.device).tril_()
        mask = F.pad(new_mask, (n_past, 0), value=True) if n_past else new_mask
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and n_new > 1, enable_gqa=q.shape[0] != k.shape[0]
    )
    return out.transpose(0, 1).reshape(n_new, -1)
