"""The Triton backend: GPU kernels for the memory-bound work of a decoding step, behind `dispatch`'s operations.

It takes, on CUDA: RMSNorm and residual add + RMSNorm, RoPE, RoPE fused with a dense cache's append, SwiGLU
(`triton_norm.py`), the weight-only int8 and int4 products with their dequantization fused in
(`triton_linear.py`), decode and tree attention over a dense cache view (`triton_attention.py`), one decoding
step's attention over KIVI's codes and Mustafar's bitmaps (`triton_kivi.py`, `triton_mustafar.py`); and
DFloat11's decoder for `DFloat11Linear` (`triton_dfloat11.py`, not a dispatch operation: the layer calls it).
Dense bf16 products, prompt attention and top-k stay with torch (cuBLAS, FlashAttention and torch's top-k are
already the fast paths there). Each operation's `*_fits` check says
which inputs the kernel takes; the reference runs the others, and the run records that it did.

Triton's interpreter runs the same kernels on CPU tensors when TRITON_INTERPRET=1 is set before Triton is first
imported (Triton fixes the mode when its own library loads): tests/test_triton_kernels.py checks every kernel
that way in a subprocess on machines without a GPU, and there `supports` answers for the CPU instead of CUDA
(so WORKBENCH_KERNELS=triton runs a model through the interpreter, slowly). Its float32 -> bf16 casts truncate
where the GPU's round to nearest, so interpreted results may differ by one bf16 ulp.
"""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction

from workbench.kernels import (
    backend_torch,
    triton_attention,
    triton_dfloat11,
    triton_kivi,
    triton_linear,
    triton_mustafar,
    triton_norm,
)

NAME = "triton"
OPERATIONS = ("linear_int8", "linear_int4", "attention", "tree_attention", "rms_norm", "add_rms_norm", "rope",
              "rope_append", "swiglu", "kivi_attention", "mustafar_attention")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_ROWS = 128  # query rows (query heads per kv head x new tokens) one attention program holds in registers


def interpreting() -> bool:
    """Whether the kernels are loaded for Triton's interpreter (then they run on CPU tensors)."""
    return isinstance(triton_norm._rms_norm_kernel, InterpretedFunction)


def available() -> bool:
    """Whether the kernels can run here: a CUDA GPU, or the interpreter."""
    return interpreting() or torch.cuda.is_available()


def unavailable_reason() -> str:
    if available():
        return ""
    return ("Triton's kernels need a CUDA GPU (none is visible); set TRITON_INTERPRET=1 to run them in its "
            "interpreter on the CPU (slow, for tests)")


def supports(operation: str, device: torch.device, dtype: torch.dtype) -> bool:
    """The operations above in bf16, fp16 or fp32 on CUDA (compiled) or on the CPU (interpreted)."""
    if operation not in OPERATIONS or dtype not in DTYPES:
        return False
    interpreted = interpreting()
    return (device.type == "cuda" and not interpreted) or (device.type == "cpu" and interpreted)


decode_dfloat11 = triton_dfloat11.decode_bf16  # cpu_dfloat11.decode_bf16's contract, on the GPU


# Linear products: the layouts `workbench/compression/` stores (triton_linear.py's docstring).

def weight_fits(weight_format: str, out_features: int, in_features: int, group: int = 0) -> bool:
    """int8 of any shape; int4 in whole 64-row tiles with groups of a multiple of 32 inputs; no dense bf16."""
    if weight_format == "int4":
        return out_features % triton_linear.TILE == 0 and group % 32 == 0 and group > 0 and in_features % group == 0
    return weight_format == "int8"


def pack_int8(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes int8 [N, K], scales [N]: read as they are."""
    return codes.contiguous(), scales.contiguous()


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 [N, K] in 0..15, scales and offsets [N, K / group] -> torch's tiled int4 layout and
    scale_zeros (`backend_torch.pack_int4`, converted on the CPU), on the codes' device."""
    packed, scale_zeros = backend_torch.pack_int4(codes, scales, offsets, dtype)
    return packed.to(codes.device), scale_zeros.to(codes.device)


def linear_int8_fits(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias) -> bool:
    return x.stride(-1) == 1 and codes.is_contiguous() and x.device == codes.device


def linear_int4_fits(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int, bias) -> bool:
    return x.stride(-1) == 1 and packed.is_contiguous() and scale_zeros.is_contiguous() and x.device == packed.device


linear_int8, linear_int4 = triton_linear.linear_int8, triton_linear.linear_int4


# Attention (arguments as in backend_torch).

def _attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    heads, dim = q.shape[1], q.shape[2]
    return (q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and dim <= 256 and heads % k.shape[0] == 0
            and heads // k.shape[0] * q.shape[0] <= MAX_ROWS and k.dtype == v.dtype)


def attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return _attention_fits(q, k, v)


def tree_attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, new_mask: torch.Tensor | None,
                        n_past: int) -> bool:
    shape_ok = new_mask is None or tuple(new_mask.shape) == (q.shape[0], q.shape[0])
    return _attention_fits(q, k, v) and shape_ok and n_past + q.shape[0] == k.shape[1]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return triton_attention.attention(q, k, v)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, new_mask: torch.Tensor | None,
                   n_past: int) -> torch.Tensor:
    return triton_attention.tree_attention(q, k, v, new_mask, n_past)


# Attention over a compressed cache layer's stored form (one decoding step; `layer` after the step's append).

def _layer_fits(q: torch.Tensor, layer) -> bool:
    """One query row per head group over a layer whose every kv head is compressed (heads kept raw take the
    reference), with the raw window's keys in q's dtype."""
    raw_k, raw_v = layer.raw.view()
    return q.shape[0] == 1 and not layer.n_full and _attention_fits(q, raw_k, raw_v) and raw_k.dtype == q.dtype


def kivi_attention_fits(q: torch.Tensor, layer) -> bool:
    return _layer_fits(q, layer)


def mustafar_attention_fits(q: torch.Tensor, layer) -> bool:
    return _layer_fits(q, layer) and q.shape[2] % 8 == 0


def kivi_attention(q: torch.Tensor, layer) -> torch.Tensor:
    return triton_kivi.kivi_layer_attention(q, layer)


def mustafar_attention(q: torch.Tensor, layer) -> torch.Tensor:
    return triton_mustafar.mustafar_layer_attention(q, layer)


# The small work between the products.

def rms_norm_fits(x: torch.Tensor, weight: torch.Tensor, eps: float) -> bool:
    return x.stride(-1) == 1 and weight.is_contiguous() and weight.dtype == x.dtype and x.shape[-1] <= 16384


def add_rms_norm_fits(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> bool:
    return rms_norm_fits(x, weight, eps) and delta.shape == x.shape and delta.stride(-1) == 1


def rope_fits(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> bool:
    table = (x.shape[0], 1, x.shape[2])
    return (x.dim() == 3 and x.stride(-1) == 1 and x.shape[2] % 2 == 0 and tuple(cos.shape) == table
            and tuple(signed_sin.shape) == table and cos.is_contiguous() and signed_sin.is_contiguous())


def rope_append_fits(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, start: int) -> bool:
    table = (qkv.shape[0], 1, qkv.shape[2])
    return (qkv.dim() == 3 and qkv.stride(-1) == 1 and qkv.shape[2] % 2 == 0 and tuple(cos.shape) == table
            and tuple(signed_sin.shape) == table and cos.is_contiguous() and signed_sin.is_contiguous()
            and k_cache.stride(-1) == v_cache.stride(-1) == 1 and k_cache.dtype == v_cache.dtype == qkv.dtype
            and qkv.shape[1] > 2 * k_cache.shape[0])


def swiglu_fits(gate_up: torch.Tensor) -> bool:
    return gate_up.stride(-1) == 1 and gate_up.shape[-1] % 2 == 0


def rms_norm(x, weight, eps):
    return triton_norm.rms_norm(x, weight, eps)


def add_rms_norm(x, delta, weight, eps):
    return triton_norm.add_rms_norm(x, delta, weight, eps)


def rope(x, cos, signed_sin):
    return triton_norm.rope(x, cos, signed_sin)


def rope_append(qkv, cos, signed_sin, k_cache, v_cache, start):
    return triton_norm.rope_append(qkv, cos, signed_sin, k_cache, v_cache, start)


def swiglu(gate_up):
    return triton_norm.swiglu(gate_up)


# DFloat11's decoder: not an operation (the layer calls it for its own layout; `DFloat11Linear.decoder`).

def decodes_dfloat11(device: torch.device) -> bool:
    """Whether `triton_dfloat11` decodes tensors on `device` here (CUDA compiled, or the CPU interpreted)."""
    interpreted = interpreting()
    return (device.type == "cuda" and not interpreted) or (device.type == "cpu" and interpreted)


decode_dfloat11 = triton_dfloat11.decode_bf16  # cpu_dfloat11.decode_bf16's contract, on the GPU
