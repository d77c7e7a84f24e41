"""The C backend: the workbench's CPU kernels (`cpu_gemm.c`, loaded by `cpu.py`) behind `dispatch`'s operations.

It takes bf16 work on CPUs with AVX512-BF16 where the C kernels build, and float32 top-k on any CPU where they
run. Each operation's `*_fits` check says whether the kernel takes the given tensors (layouts, sizes); where
it does not, `dispatch` runs the torch reference instead and records that it did. Every kernel computes a
row the same way whatever the other rows are, so a verified draft token gets exactly the bits of its
one-token step.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

import torch

from workbench.kernels import cpu
from workbench.kernels.backend_torch import visible_keys

if TYPE_CHECKING:
    from torch import nn

NAME = "c"


def available() -> bool:
    """Whether the C kernels run on this machine (built on first call; says why once where they cannot)."""
    return cpu.available()


def unavailable_reason() -> str:
    return cpu.unavailable_reason()


NOT_TAKEN = ("prefill_attention", "rope_append", "kivi_attention", "mustafar_attention")  # the reference runs them


def supports(operation: str, device: torch.device, dtype: torch.dtype) -> bool:
    """CPU only; bf16 activations, except top-k, which takes the float32 logits of any model."""
    if device.type != "cpu" or operation in NOT_TAKEN or not cpu.available():
        return False
    return operation == "topk" or dtype == torch.bfloat16


# Linear products: the weight in the kernels' blocked layouts (cpu.pack_bf16, pack_int8, pack_int4).

def weight_fits(weight_format: str, out_features: int, in_features: int, group: int = 0) -> bool:
    """Whether the kernels take a weight of this format ("bf16", "int8", "int4", "int8_a8", "int4_a8") and shape."""
    if weight_format.endswith("_a8"):
        return cpu.a8_fits(weight_format.removesuffix("_a8"), out_features, in_features, group)
    if weight_format == "int4":
        return cpu.int4_fits(out_features, in_features, group)
    return cpu.fits(out_features, in_features)


pack_bf16, unpack_bf16 = cpu.pack_bf16, cpu.unpack_bf16
linear = cpu.gemm_bf16  # (x, packed, bias)


def pack_int8(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes int8 [N, K], scales [N] -> (codes in the kernels' blocked layout, float32 scales)."""
    return cpu.pack_int8(codes), scales.float()


linear_int8 = cpu.gemm_int8  # (x, packed codes, float32 scales, bias)


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 [N, K] in 0..15, scales and offsets [N, K / group] -> `cpu.pack_int4`'s (codes, params)."""
    return cpu.pack_int4(codes, scales.to(dtype), offsets.to(dtype))


linear_int4 = cpu.gemm_int4  # (x, packed codes, params, group, bias)
# The same layouts multiplied by int8 activations (AVX512-VNNI integer dot products)
linear_int8_a8 = partial(cpu.gemm_int8, int8_activations=True)
linear_int4_a8 = partial(cpu.gemm_int4, int8_activations=True)


# Attention (arguments as in backend_torch).

def attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *mask) -> bool:
    return cpu.attention_fits(q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return cpu.attention(q, k, v, None)


tree_attention_fits = attention_fits


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, new_mask: torch.Tensor | None,
                   n_past: int) -> torch.Tensor:
    return cpu.attention(q, k, v, visible_keys(new_mask, q.shape[0], n_past, q.device))


# The small work between the products.

def rms_norm_fits(x: torch.Tensor, weight: torch.Tensor, eps: float) -> bool:
    return cpu.rows_fit(x) and weight.dtype == x.dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return cpu.rms_norm(x, weight, eps)[1]


def add_rms_norm_fits(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> bool:
    return cpu.rows_fit(x) and weight.dtype == delta.dtype == x.dtype


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return cpu.rms_norm(x, weight, eps, delta)


def swiglu_fits(gate_up: torch.Tensor) -> bool:
    return cpu.rows_fit(gate_up)


swiglu = cpu.swiglu
rope_fits, rope = cpu.rope_fits, cpu.rope
topk_fits, topk = cpu.topk_fits, cpu.topk


# The one-call decoder layers: consecutive layers that the kernels take run in one C call, the same kernels in
# the same order as their separate calls, so the same bits, without Python between layers.

def decoder_layers_fit(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> bool:
    """Whether the forward's shared inputs suit the one-call layers: bf16 rows, contiguous RoPE tables."""
    return cpu.rows_fit(x) and cos.is_contiguous() and signed_sin.is_contiguous()


def layer_row(layer: nn.Module, positions: torch.Tensor, layer_cache, new_mask: torch.Tensor | None,
              keep: list) -> list[int] | None:
    """A decoder layer's row for `decoder_layers`, or None where the one-call layer does not take it: its
    products' weights must be in the kernels' layouts (their `kernel_weights()`: bf16, int8 or int4, no bias)
    and its cache must hand over plain buffers (`writable_buffers`; only then are slots reserved in it, so
    None changes nothing). Tensors the row points into are appended to `keep`."""
    weight_args = _weight_args(layer) if layer_cache is not None else None
    if weight_args is None:
        return None
    buffers = layer_cache.writable_buffers(positions, torch.bfloat16)  # last: it reserves the slots
    if buffers is None:
        return None
    k, v, past = buffers
    visible = visible_keys(new_mask, positions.shape[-1], past, positions.device)
    visible = None if visible is None else visible.contiguous()
    keep.append(visible)
    return weight_args + cpu.layer_cache_args(k, v, past, visible)


# A layer's weight arguments are the same every step: worked out once per layer and kept beside what they point
# into. Each step checks that the layer still holds the same parts (a weight transform replaces a product), the
# same buffers in them (`module.to` replaces buffers) and its parameters at the same addresses (it moves
# parameters' data). The parts and buffers are held here, so none can be freed and its id or address reused.
# Keyed weakly by the layer, outside it, so a copied model does not inherit pointers into the original's tensors.
_weight_args_of: WeakKeyDictionary = WeakKeyDictionary()  # layer -> (signature, what it holds, args or None)


def _weight_args(layer: nn.Module) -> list[int] | None:
    # the module's own dicts, not attribute access: nn.Module's __getattr__ costs a microsecond a name
    parts = (*layer._parameters.values(), *layer._modules.values())
    buffers = [b for m in layer._modules.values() for b in m._buffers.values()]
    signature = (*map(id, parts), *map(id, buffers),
                 *(p.data_ptr() for p in layer._parameters.values() if p is not None))
    known = _weight_args_of.get(layer)
    if known is not None and known[0] == signature:
        return known[2]
    weights = [getattr(m, "kernel_weights", lambda: None)() for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    takes = (layer.q_norm is None and layer.head_dim % 32 == 0 and layer.head_dim <= 256
             and layer.down.in_features % 16 == 0 and None not in weights
             and layer.attn_norm.dtype == layer.mlp_norm.dtype == torch.bfloat16)
    args = cpu.layer_weight_args((layer.attn_norm, layer.mlp_norm), weights) if takes else None
    _weight_args_of[layer] = (signature, (parts, buffers, weights), args)  # weights: PackedLinear's plain tensors
    return args


def decoder_layers(x: torch.Tensor, rows: list[list[int]], config, cos: torch.Tensor, signed_sin: torch.Tensor
                   ) -> torch.Tensor:
    """The layers of `rows` (from `layer_row`) on x [T, hidden] in one call; RoPE tables [T, 1, head_dim]."""
    c = config
    return cpu.decoder_layers(x, rows, c.rms_norm_eps, c.num_heads, c.num_kv_heads, c.head_dim,
                              c.intermediate_size, cos, signed_sin)
