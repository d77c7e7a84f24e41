"""Attention over whatever a layer cache holds.

The model calls `attention` once per layer with the new tokens' q, k, v. The layer cache stores k and v
(or, with no cache, the new tokens are the whole context) and the scores are computed against every
token the cache holds plus the new ones. Which tokens the new ones may see among themselves comes from
`new_mask` (a tree mask during verification); every committed token is visible to every new token.
Compressed storage forms (quantized, sparse, selected tokens) plug in through the cache's `view`, or attend
themselves (`attend`); a one-token step over a form a kernel reads directly (KIVI's codes, Mustafar's bitmaps:
the layer's `attention_operation`) runs that kernel where the dispatch binds one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from workbench.kernels import dispatch
from workbench.kernels.backend_torch import group_rows, grouped_sdpa

if TYPE_CHECKING:
    from workbench.cache.base import LayerCache

# Up to this many new tokens (decode steps, draft trees) use the small-query operations; more use prefill's.
SMALL_QUERY = dispatch.SMALL_QUERY


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    layer_cache: LayerCache | None,
    new_mask: torch.Tensor | None,
    kernels: dispatch.Kernels | None = None,
) -> torch.Tensor:
    """Attend the new tokens' queries to the cache and to themselves.

    q: [T, heads, dim]; k, v: [T, kv_heads, dim], or None where the new tokens' keys and values are already
    written into the cache's reserved slots (`rope_append`); positions: [T] logical positions of the new tokens.
    new_mask: [T, T] bool (True = may attend) among the new tokens, or None for causal.
    kernels: the model's (`dispatch.kernels`); resolved from q when not given.
    Returns [T, heads * dim].
    """
    n_new = q.shape[0]
    kernels = kernels or dispatch.kernels(q.device, q.dtype)
    if layer_cache is not None and layer_cache.fixed_shape:  # a static step: every slot, masked (static_step.py)
        dispatch.note("static_attention", "torch")
        return layer_cache.attend_fixed(q, k, v, positions)
    if layer_cache is not None:
        if k is not None:
            layer_cache.append(k.transpose(0, 1), v.transpose(0, 1), positions)
        stored_form = layer_cache.attention_operation
        if (stored_form in kernels.reads_stored_form and n_new == 1 and new_mask is None
                and layer_cache.observer is None):  # a kernel reads the compressed form itself (KIVI, Mustafar)
            return getattr(kernels, stored_form)(q, layer_cache)
        if layer_cache.observer is not None or layer_cache.attends_itself:
            full_mask = _full_mask(new_mask, n_new, layer_cache.length, q.device)
            if layer_cache.observer is not None:
                layer_cache.observer.observe(layer_cache, q.transpose(0, 1), layer_cache.view()[0], full_mask)
            if layer_cache.attends_itself:  # sparse or selected-token forms compute attention themselves (torch)
                dispatch.note("attention" if n_new == 1 else "tree_attention", "torch")
                return layer_cache.attend(q.transpose(0, 1), full_mask).transpose(0, 1).reshape(n_new, -1)
        k, v = layer_cache.view()
    else:
        k, v = k.transpose(0, 1), v.transpose(0, 1)
    if n_new == 1 and new_mask is None:  # one decoding step
        return kernels.attention(q, k, v)
    if n_new <= SMALL_QUERY or new_mask is not None:
        # a short chunk, or a draft tree of any size: a verified row must be computed as its one-row step would
        # be (the row-independent kernels), or a lossless drafter's greedy output could differ from plain's
        return kernels.tree_attention(q, k, v, new_mask, k.shape[1] - n_new)
    return kernels.prefill_attention(q, k, v, new_mask, k.shape[1] - n_new)


def _full_mask(new_mask: torch.Tensor | None, n_new: int, length: int, device: torch.device) -> torch.Tensor | None:
    """[T, S] mask of the new tokens over every key held (None: a causal prompt with nothing before it)."""
    n_past = length - n_new
    if new_mask is None:
        if n_past == 0 and n_new > 1:
            return None
        new_mask = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril_()
    return F.pad(new_mask, (n_past, 0), value=True) if n_past else new_mask


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """Softmax attention for a few queries (a draft tree, a short chunk) with grouped kv heads, without
    copying k and v per query head (the storage forms that attend themselves use it).

    q: [heads, T, dim]; k, v: [kv_heads, S, dim]; mask: [T, S] bool or None. Returns [heads, T, dim].
    """
    return grouped_sdpa(q, k, v, None if mask is None else group_rows(mask, q.shape[0] // k.shape[0]))
