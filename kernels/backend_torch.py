"""The torch backend: every operation of `dispatch.OPERATIONS` in plain torch, on any device and dtype.

It is the reference the other backends are tested against (tests/test_kernel_dispatch.py) and what runs
wherever no other backend takes an operation. Linear products take the weight in this backend's layouts:
bf16 in oneDNN's blocked layout on CPUs with native bf16 (bitwise `F.linear`'s results, 2-3x faster for one
row), dense elsewhere; int8 codes dense with their row scales (`_weight_int8pack_mm`); int4 in torch's tiled
int4 layout (`_weight_int4pack_mm_for_cpu`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "torch"


def supports(operation: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Every operation, everywhere, except the one-call decoder layers (this backend runs them layer by layer)."""
    return operation != "decoder_layers"


# Linear products, one per weight format.

def onednn_bf16() -> bool:
    """Whether this CPU runs oneDNN's bf16 products natively (the blocked layout is only faster there)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bf16 -> oneDNN's blocked layout on a CPU with native bf16; the dense weight elsewhere."""
    if weight.is_cpu and onednn_bf16():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    return weight.detach()


def unpack_bf16(packed: torch.Tensor) -> torch.Tensor:
    return packed.to_dense() if packed.is_mkldnn else packed


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias), W from `pack_bf16`."""
    if packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, packed, bias)


def pack_int8(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes int8 [N, K], scales [N]: torch's int8 kernel takes them as they are."""
    return codes, scales


def linear_int8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    """x [..., K] @ (codes * scales[:, None])^T (+ bias): codes int8 [N, K], scales [N] in x's dtype; torch's
    int8 kernel on the CPU, a dequantized dense product elsewhere."""
    if x.is_cpu and x.dtype == scales.dtype:  # one kernel, no reshape for 2-D x
        y = torch.ops.aten._weight_int8pack_mm(x if x.dim() == 2 else x.reshape(-1, codes.shape[1]), codes, scales)
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], codes.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, (codes.to(torch.float32) * scales.float()[:, None]).to(x.dtype), bias)


A8_BLOCK = 32  # inputs per int8 activation scale


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] with each block of 32 inputs rounded to its int8 grid, in float32: code = round(x * (127 /
    amax)), value = code * (amax / 127), as the integer-dot-product kernels quantize it (bit for bit)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, A8_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    # a tensor divided, not 127.0 / amax: torch computes that as 127 * (1 / amax), which rounds differently
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse) * (amax / 127.0)).reshape(x.shape)


def linear_int8_a8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor:
    """`linear_int8` of x's int8 activations (`quantize_activations`, then rounded to x's dtype)."""
    return linear_int8(quantize_activations(x).to(x.dtype), codes, scales, bias)


INT4_TILE = 64  # torch's CPU int4 layout interleaves rows in tiles of 64 (rows j and j+32 share a byte)
INT4_GROUPS = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts


def int4_fits(out_features: int, in_features: int, group: int) -> bool:
    """Whether torch's CPU int4 kernel takes a weight of this shape and group."""
    return out_features % INT4_TILE == 0 and group in INT4_GROUPS


def int4_scale_zeros(scales: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scales, offsets [N, K / group] (weight = scale * code + offset) -> torch's [K / group, N, 2] in `dtype`,
    with weight = (code - 8) * scale + zero."""
    zeros = offsets.float() + 8 * scales.float()
    return torch.stack([scales.float().T, zeros.T], dim=-1).to(dtype).contiguous()


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 [N, K] in 0..15 (N a multiple of INT4_TILE), scales and offsets [N, K / group] -> (torch's
    tiled int4 codes, `int4_scale_zeros`)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.cpu().to(torch.int32), 1)
    return packed, int4_scale_zeros(scales, offsets, dtype)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias), W held by `pack_int4`; x on the CPU in scale_zeros' dtype."""
    n = scale_zeros.shape[1]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), packed, group,
                                                   scale_zeros)
    y = y.view(*x.shape[:-1], n)
    return y if bias is None else y + bias


def linear_int4_a8(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """`linear_int4` of x's int8 activations (`quantize_activations`, then rounded to x's dtype)."""
    return linear_int4(quantize_activations(x).to(x.dtype), packed, scale_zeros, group, bias)


# Attention of new tokens' queries over a layer's keys and values (q: [T, heads, dim]; k, v: [kv_heads, S, dim],
# the new tokens' keys last; query heads g * group .. (g + 1) * group - 1 share kv head g).

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One decoding step, every key visible: the group of query heads sharing a kv head acts as that head's
    queries, so one fused call does it with no copies of k and v (4-D inputs take the fused CPU kernel; 3-D
    ones fall back to the unfused math path). Returns [1, heads * dim]."""
    heads, dim = q.shape[1], q.shape[2]
    out = F.scaled_dot_product_attention(q.view(1, k.shape[0], heads // k.shape[0], dim), k[None], v[None])
    return out.reshape(1, heads * dim)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, new_mask: torch.Tensor | None,
                   n_past: int) -> torch.Tensor:
    """A few query rows (a draft tree, a short chunk): new_mask [T, T] bool among the new tokens (None is
    causal), every one of the `n_past` earlier keys visible. Returns [T, heads * dim]."""
    n_new, heads = q.shape[0], q.shape[1]
    mask = visible_keys(new_mask, n_new, n_past, q.device, heads // k.shape[0], q.dtype)
    return grouped_sdpa(q.transpose(0, 1), k, v, mask).transpose(0, 1).reshape(n_new, -1)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, new_mask: torch.Tensor | None,
                      n_past: int) -> torch.Tensor:
    """Long queries (a prompt): the fused kernel, which never materialises all the scores; k and v expanded
    per query head. Same arguments as `tree_attention`."""
    n_new = q.shape[0]
    q = q.transpose(0, 1)
    plain_causal = new_mask is None and n_past == 0  # a prompt with nothing cached before it
    if new_mask is None:
        new_mask = torch.ones(n_new, n_new, dtype=torch.bool, device=q.device).tril_()
    mask = F.pad(new_mask, (n_past, 0), value=True) if n_past else new_mask
    group = q.shape[0] // k.shape[0]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if plain_causal else mask, is_causal=plain_causal)
    return out.transpose(0, 1).reshape(n_new, -1)


# The masks `visible_keys` built last, with what they were built from: every layer of a forward asks for the
# same one (30 times per draft verification), and building it costs more than the attention it masks.
_last_masks: tuple = (None, None, {})


def visible_keys(new_mask: torch.Tensor | None, n_new: int, n_past: int, device: torch.device,
                 group: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Which keys each new token sees: [T, S] bool over `n_past` earlier keys (all visible) and the new ones
    (new_mask; None is causal), or None when every key is visible. With `group`, the additive mask
    [1, 1, group * T, S] in `dtype` that `grouped_sdpa` takes."""
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
                mask = group_rows(mask, group)
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
            forms[(group, dtype)] = mask
    return forms[(group, dtype)]


def group_rows(mask: torch.Tensor, group: int) -> torch.Tensor:
    """[T, S] mask -> [1, 1, group * T, S]: the rows of one kv head's group of query heads (see below)."""
    return mask.repeat(group, 1)[None, None]


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of q [heads, T, dim] over k, v [kv_heads, S, dim] with the mask already expanded by
    `group_rows` (bool, or additive in q's dtype), without copying k and v per query head.

    Query heads g * group .. (g + 1) * group - 1 share kv head g, as in transformers' repeat_kv: each kv
    head's group of query heads becomes group * T query rows of one fused SDPA call (4-D, so the CPU takes
    its fused kernel, faster than float32 batched products), the [T, S] mask repeated per head.
    Returns [heads, T, dim].
    """
    heads, n, dim = q.shape
    kv_heads = k.shape[0]
    rows = q.reshape(1, kv_heads, heads // kv_heads * n, dim)
    out = F.scaled_dot_product_attention(rows, k[None], v[None], attn_mask=mask)  # [1, kv_heads, group*T, dim]
    return out.reshape(heads, n, dim)  # the CUDA kernels may return a strided layout


# Attention over a compressed cache layer's stored form, one decoding step (q: [1, heads, dim]; `layer` as it
# stands after the step's token was appended). The references are the model's own path: KIVI's codes
# dequantized (`view`), then `attention`; Mustafar's torch SpMV (`MustafarLayerCache.attend`).

def kivi_attention(q: torch.Tensor, layer) -> torch.Tensor:
    """q over a KIVI `CompressedLayerCache` (workbench/cache/kivi.py), every key visible. Returns [1, heads * dim]."""
    k, v = layer.view()
    return attention(q, k, v)


def mustafar_attention(q: torch.Tensor, layer) -> torch.Tensor:
    """q over a `MustafarLayerCache` (workbench/cache/mustafar.py), every key visible. Returns [1, heads * dim]."""
    return layer.attend(q.transpose(0, 1), None).transpose(0, 1).reshape(1, -1)


# The small work between the products.

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm [arXiv 1910.07467, eq. 4]: x / sqrt(mean(x^2) + eps) * weight, through the fused LayerNorm
    kernel: [x, -x] has mean 0 and variance mean(x^2), so LayerNorm of it is RMSNorm of x in its first half
    (4 kernels where `F.rms_norm` takes about 8)."""
    d = x.shape[-1]
    return F.layer_norm(torch.cat((x, -x), dim=-1), (2 * d,), None, None, eps)[..., :d] * weight


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: (x + delta, rms_norm(x + delta))."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU [arXiv 2002.05202, eq. 5] on the fused gate|up product [..., 2I]: silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + dim/2) [RoFormer, arXiv 2104.09864, eq. 34; Hugging Face's half layout]:
    x * cos + (-x2, x1) * sin, written as x * cos + roll(x, dim/2) * (-sin, sin) to take three kernels.
    x: [T, heads, dim]; cos, signed_sin: [T, 1, dim]."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def rope_append(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, start: int) -> torch.Tensor:
    """RoPE of the fused q|k|v product's q and k heads, and the cache append: qkv [T, heads + 2 kv_heads, dim];
    k and v of the T tokens written into k_cache, v_cache [kv_heads, capacity, dim] at slots start..start+T-1
    (reserved by the cache's `writable_buffers`). Returns q [T, heads, dim], rotated."""
    n, kv_heads = qkv.shape[0], k_cache.shape[0]
    heads = qkv.shape[1] - 2 * kv_heads
    qk = rope(qkv[:, : heads + kv_heads], cos, signed_sin)
    k_cache[:, start: start + n] = qk[:, heads:].transpose(0, 1)
    v_cache[:, start: start + n] = qkv[:, heads + kv_heads:].transpose(0, 1)
    return qk[:, :heads]


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of a 2-D tensor, descending, and their indices."""
    values, indices = torch.topk(x, k, dim=-1)
    return values, indices
