"""Triton kernels for the small work between the products: RMSNorm, residual add + RMSNorm, RoPE, SwiGLU.

Each program takes one row (norms, SwiGLU) or one (token, head) pair (RoPE) and computes in float32, rounding
once to the output's dtype, so one launch replaces the reference's several elementwise kernels. Rows must be
contiguous in their last dimension (`backend_triton` checks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, delta_ptr, w_ptr, sum_ptr, out_ptr, d, x_stride, delta_stride, eps,
                     ADD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < d
    x = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=0.0).to(tl.float32)
    if ADD:  # the residual add, rounded to the model's dtype as the reference's separate add rounds it
        x += tl.load(delta_ptr + row * delta_stride + cols, mask=inside, other=0.0).to(tl.float32)
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * d + cols, x, mask=inside)
        x = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / d + eps)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * d + cols, (x * inv * w).to(out_ptr.dtype.element_ty), mask=inside)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as 2-D rows [R, d] with a unit last stride (a view where it can be)."""
    return x.reshape(-1, x.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    d = rows.shape[1]
    _rms_norm_kernel[(rows.shape[0],)](rows, rows, weight, out, out, d, rows.stride(0), rows.stride(0), eps,
                                       ADD=False, BLOCK=triton.next_power_of_2(d))
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    rows, deltas = _rows(x), _rows(delta)
    total, out = (torch.empty(rows.shape, dtype=x.dtype, device=x.device) for _ in range(2))
    d = rows.shape[1]
    _rms_norm_kernel[(rows.shape[0],)](rows, deltas, weight, total, out, d, rows.stride(0), deltas.stride(0), eps,
                                       ADD=True, BLOCK=triton.next_power_of_2(d))
    return total.view(x.shape), out.view(x.shape)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, dim, x_stride_t, x_stride_h, table_stride,
                 BLOCK: tl.constexpr):
    pair = tl.program_id(0)  # token * heads + head
    t, h = pair // heads, pair % heads
    cols = tl.arange(0, BLOCK)
    inside = cols < dim
    base = x_ptr + t * x_stride_t + h * x_stride_h
    x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
    rolled = tl.load(base + (cols + dim // 2) % dim, mask=inside, other=0.0).to(tl.float32)  # roll by dim/2
    cos = tl.load(cos_ptr + t * table_stride + cols, mask=inside, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * table_stride + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + pair * dim + cols, (x * cos + rolled * sin).to(out_ptr.dtype.element_ty), mask=inside)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, dim] (unit last stride); cos, signed_sin [T, 1, dim] contiguous."""
    n, heads, dim = x.shape
    out = torch.empty((n, heads, dim), dtype=x.dtype, device=x.device)
    _rope_kernel[(n * heads,)](x, cos, signed_sin, out, heads, dim, x.stride(0), x.stride(1), cos.stride(0),
                               BLOCK=triton.next_power_of_2(dim))
    return out


@triton.jit
def _swiglu_kernel(gu_ptr, out_ptr, inner, stride, BLOCK: tl.constexpr):
    row, block = tl.program_id(0), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    inside = cols < inner
    gate = tl.load(gu_ptr + row * stride + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride + inner + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * inner + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=inside)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    rows = _rows(gate_up)
    inner = rows.shape[1] // 2
    out = torch.empty((rows.shape[0], inner), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inner))
    _swiglu_kernel[(rows.shape[0], triton.cdiv(inner, block))](rows, out, inner, rows.stride(0), BLOCK=block)
    return out.view(*gate_up.shape[:-1], inner)


@triton.jit
def _rope_append_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, heads, kv_heads, dim, start, qkv_stride_t,
                        qkv_stride_h, table_stride, k_stride_h, k_stride_s, v_stride_h, v_stride_s,
                        BLOCK: tl.constexpr):
    pair = tl.program_id(0)  # token * (heads + 2 kv_heads) + head of the fused q|k|v product
    width = heads + 2 * kv_heads
    t, h = pair // width, pair % width
    cols = tl.arange(0, BLOCK)
    inside = cols < dim
    base = qkv_ptr + t * qkv_stride_t + h * qkv_stride_h
    x = tl.load(base + cols, mask=inside, other=0.0)
    if h < heads + kv_heads:  # q or k: rotated as `_rope_kernel` rotates (the same bits)
        xf = x.to(tl.float32)
        rolled = tl.load(base + (cols + dim // 2) % dim, mask=inside, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + t * table_stride + cols, mask=inside, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + t * table_stride + cols, mask=inside, other=0.0).to(tl.float32)
        rotated = (xf * cos + rolled * sin).to(q_ptr.dtype.element_ty)
        if h < heads:
            tl.store(q_ptr + (t * heads + h) * dim + cols, rotated, mask=inside)
        else:  # the key goes straight into its cache slot
            tl.store(k_ptr + (h - heads) * k_stride_h + (start + t) * k_stride_s + cols, rotated, mask=inside)
    else:
        tl.store(v_ptr + (h - heads - kv_heads) * v_stride_h + (start + t) * v_stride_s + cols, x, mask=inside)


def rope_append(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, start: int) -> torch.Tensor:
    """qkv [T, heads + 2 kv_heads, dim] (unit last stride); cos, signed_sin [T, 1, dim] contiguous; k_cache,
    v_cache [kv_heads, capacity, dim] (unit last stride). One launch: q rotated into a new [T, heads, dim], k
    rotated and v copied into cache slots start..start+T-1."""
    n, width, dim = qkv.shape
    kv_heads = k_cache.shape[0]
    heads = width - 2 * kv_heads
    q = torch.empty((n, heads, dim), dtype=qkv.dtype, device=qkv.device)
    _rope_append_kernel[(n * width,)](qkv, cos, signed_sin, q, k_cache, v_cache, heads, kv_heads, dim, start,
                                      qkv.stride(0), qkv.stride(1), cos.stride(0), k_cache.stride(0),
                                      k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                                      BLOCK=triton.next_power_of_2(dim))
    return q
