"""CPU kernels for decoding and draft verification (the C source is `cpu_gemm.c`, with `cpu_attention.c`).

- Matrix products, bf16, int8 and int4 weights. oneDNN's bf16 product slows with each extra row of a draft
  tree (docs/performance.md), although the weights are streamed from memory once whatever the row count.
  These load each block of weights once and apply it to up to 12 rows held in registers, so verifying a
  handful of drafted tokens costs about what one token costs, and one row is also faster than oneDNN's.
  Where the CPU has AMX tiles, the bf16 products run on them (`product_unit()`): 16 rows then cost what one
  does (`WORKBENCH_CPU_AMX=0` keeps AVX512-BF16, whose one-row product is about 10% faster).
- Attention of a few query rows over the cache (grouped kv heads, a draft tree's mask), faster than torch's
  fused CPU attention at these sizes; on the AMX tiles too (heads of 64 dims), where a draft's rows over a long
  cache cost little more than one row.
- The small work between them, one call each instead of several torch calls: RMSNorm (with the residual add
  folded in), SwiGLU and RoPE.
- The top-k of each row of float32 logits (the greedy choice, the views' alternatives, token recycling's
  candidates), faster than torch's topk over a large vocabulary.

Every kernel computes a row the same way whatever the other rows are, so a verified draft token gets exactly
the bits its one-token step would: lossless drafters stay token-identical to plain decoding in bf16.

The C file is compiled with the system's C compiler the first time it is needed and cached under
`~/.cache/workbench/kernels` (or `$WORKBENCH_KERNEL_CACHE`), keyed by the source's hash. Where there is no
compiler, the CPU lacks AVX512-BF16, or `WORKBENCH_CPU_KERNELS=0` is set, `available()` is False and callers
keep their torch paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from workbench.kernels import backend_torch

SOURCE = Path(__file__).with_name("cpu_gemm.c")
BLOCK = 16  # output features are worked in blocks of 16 rows

_lib: ctypes.CDLL | None = None
_tried = False
_reason = ""  # why the kernels do not run here, in plain words ("" while they run or before the first try)
COST = ("bf16 decoding then takes torch's oneDNN paths, several times slower for one-token steps, and lossless "
        "drafters in bf16 only agree with plain decoding instead of matching it token for token")


def _cache_dir() -> Path:
    return Path(os.environ.get("WORKBENCH_KERNEL_CACHE", Path.home() / ".cache" / "workbench" / "kernels"))


def build_library(source: Path) -> tuple[Path | None, str]:
    """`source` compiled into a shared library, cached by the source's and flags' hash: (its path, "") or
    (None, why not, in plain words). Shared by every C file of the kernels (cpu_gemm.c, cpu_dfloat11.c)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler was found (install gcc, or set CC)"
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", *os.environ.get("WORKBENCH_KERNEL_FLAGS", "").split()]
    included = re.findall(rb'^#include "([^"]+)"', source.read_bytes(), re.MULTILINE)  # its sibling C files
    content = source.read_bytes() + b"".join(source.with_name(name.decode()).read_bytes() for name in included)
    key = hashlib.sha256(content + " ".join(flags).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}_{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then move: no half-written .so
                built = Path(tmp) / target.name
                result = subprocess.run([compiler, *flags, str(source), "-o", str(built)],
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    raise OSError(result.stderr)
                built.replace(target)
        except OSError as err:  # no compiler that works, or nowhere to write: torch's paths still work
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return None, (f"they could not be built ({first}); set WORKBENCH_KERNEL_CACHE to a writable folder or "
                          "fix the compiler")
    return target, ""


def _build() -> ctypes.CDLL | None:
    global _reason
    target, _reason = build_library(SOURCE)
    if target is None:
        return None
    # torch has loaded its OpenMP runtime already; the library binds to that one (same soname), so the two
    # share one thread pool.
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        _reason = f"the built library {target} could not be loaded ({err}); delete it to rebuild"
        return None
    if not lib.workbench_cpu_supported():
        _reason = "this CPU lacks AVX512-BF16, which they need (no fix on this machine)"
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.workbench_gemm_bf16.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.workbench_gemm_int8.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.workbench_gemm_int4.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.workbench_attention_bf16.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, ptr,
                                             i64, i64, i64, i64, i64, ctypes.c_float, ptr, ctypes.c_int]
    lib.workbench_attention_scratch.argtypes = [i64, i64, i64, i64, i64, ctypes.c_int]
    lib.workbench_attention_scratch.restype = i64
    lib.workbench_rms_norm_bf16.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float]
    lib.workbench_swiglu_bf16.argtypes = [ptr, ptr, i64, i64]
    lib.workbench_rope_bf16.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64]
    lib.workbench_layers_bf16.argtypes = [ptr, ptr, ptr, i64, ptr, ctypes.c_float, i64, i64, i64, i64, i64, i64,
                                          ptr, ptr, ctypes.c_float, ptr, ptr, ctypes.c_int]
    lib.workbench_topk_f32.argtypes = [ptr, i64, i64, i64, ptr, ptr]
    lib.workbench_use_amx.argtypes = [ctypes.c_int]
    lib.workbench_amx_in_use.argtypes = []
    lib.workbench_use_amx(int(os.environ.get("WORKBENCH_CPU_AMX", "1") != "0"))
    lib.workbench_gemm_int8_a8.argtypes = lib.workbench_gemm_int8.argtypes
    lib.workbench_gemm_int4_a8.argtypes = lib.workbench_gemm_int4.argtypes
    lib.workbench_quantize_rows_q8.argtypes = [ptr, i64, i64, ptr, ptr, ptr]
    lib.workbench_read_f32.argtypes = [ptr, i64, ctypes.c_int]
    lib.workbench_read_f32.restype = ctypes.c_double
    for fn in (lib.workbench_gemm_bf16, lib.workbench_gemm_int8, lib.workbench_gemm_int4, lib.workbench_gemm_int8_a8,
               lib.workbench_gemm_int4_a8, lib.workbench_quantize_rows_q8, lib.workbench_attention_bf16,
               lib.workbench_rms_norm_bf16, lib.workbench_swiglu_bf16, lib.workbench_rope_bf16,
               lib.workbench_layers_bf16, lib.workbench_topk_f32):
        fn.restype = None
    return lib


def available() -> bool:
    """Whether the kernels run here (built on first call). When they cannot, says why once, plainly."""
    global _lib, _tried, _reason
    if not _tried:
        _tried = True
        if os.environ.get("WORKBENCH_CPU_KERNELS", "1") == "0":
            _reason = "they are switched off (WORKBENCH_CPU_KERNELS=0)"
        else:
            _lib = _build()
            if _lib is None:
                warnings.warn(f"workbench's CPU kernels do not run: {_reason}. Cost: {COST}.", stacklevel=2)
    return _lib is not None


def unavailable_reason() -> str:
    """Why the kernels do not run here ("" when they do)."""
    return "" if available() else _reason


def product_unit() -> str | None:
    """Which unit runs the bf16 products and attention: "amx" (the tile unit, where the CPU has AMX-BF16 and
    `WORKBENCH_CPU_AMX` is not 0), "avx512-bf16", or None where the kernels do not run. One unit serves every
    product and attention of the process: the two round a few outputs differently (cpu_gemm.c)."""
    if not available():
        return None
    return "amx" if _lib.workbench_amx_in_use() else "avx512-bf16"


def use_amx(on: bool) -> bool:
    """Switches the bf16 products to the tile unit (where it exists) or to AVX512-BF16; returns whether the tile
    unit is now on. For A/B measurements and tests: switching mid-run mixes units, so a run's bits are only
    reproducible under one of them."""
    return available() and bool(_lib.workbench_use_amx(int(on)))


def units_to_compare(names: str | None) -> list[str]:
    """The units a benchmark alternates (comma-separated names, or None for the process's own), each checked to
    run here; the process's own unit stays on. Raises ValueError naming the valid units."""
    own = product_unit()
    units = names.split(",") if names else [own]
    for unit in units:
        if use_amx(unit == "amx") != (unit == "amx"):
            use_amx(own == "amx")
            raise ValueError(f"the kernels cannot run on {unit} here (units: amx where the CPU has AMX tiles, "
                             "avx512-bf16)")
    use_amx(own == "amx")
    return units


def int8_dot_available() -> bool:
    """Whether the products over int8 activations run here: the kernels, and AVX512-VNNI and VBMI on this CPU."""
    return available() and bool(_lib.workbench_cpu_int8_dot_supported())


A8_BLOCK = backend_torch.A8_BLOCK  # inputs per int8 activation scale (C: A8_BLOCK)


def a8_fits(weight_format: str, out_features: int, in_features: int, group: int = 0) -> bool:
    """Whether the int8-activation product of `weight_format` ("int8", "int4") takes this shape: whole blocks
    of 32 inputs (and int4 groups of them)."""
    if not int8_dot_available() or in_features % A8_BLOCK:
        return False
    return fits(out_features, in_features) if weight_format == "int8" else int4_fits(
        out_features, in_features, group) and group % A8_BLOCK == 0


def fits(out_features: int, in_features: int) -> bool:
    """Whether the kernels run here and a weight of this shape has the layout they need."""
    return available() and out_features % BLOCK == 0 and in_features % 2 == 0


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bf16 -> [N/16, K/2, 16, 2]: per 16 output rows, each input pair's weights side by side."""
    n, k = weight.shape
    return weight.detach().to(torch.bfloat16).reshape(n // 16, 16, k // 2, 2).transpose(1, 2).contiguous()


def unpack_bf16(packed: torch.Tensor) -> torch.Tensor:
    """The dense [N, K] weight back from `pack_bf16`'s layout."""
    blocks, pairs = packed.shape[:2]
    return packed.transpose(1, 2).reshape(blocks * 16, pairs * 2)


def pack_int8(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 -> [N/16, K, 16]: per 16 output rows, each input column's codes side by side."""
    n, k = codes.shape
    return codes.reshape(n // 16, 16, k).transpose(1, 2).contiguous()


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """The dense [N, K] codes back from `pack_int8`'s layout."""
    blocks, k = packed.shape[:2]
    return packed.transpose(1, 2).reshape(blocks * 16, k)


def int8_rows(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the dense codes [len(ids), K], read from `pack_int8`'s layout without unpacking the rest."""
    return packed[ids // 16, :, ids % 16]


# int4 chunks: byte P of a block's 64-byte chunk of 8 inputs holds, in its low and high nibble, the codes of
# output NIBBLE_OUTPUT[P] for inputs NIBBLE_INPUT[0][P] and NIBBLE_INPUT[1][P] of the chunk: the order in which
# the C kernel's byte interleaves (within 128-bit lanes) turn them into bf16 pairs.
_P = torch.arange(64)
NIBBLE_OUTPUT = 4 * (_P // 16) + (_P % 8) // 2
NIBBLE_INPUT = tuple(2 * (2 * n + (_P % 16) // 8) + _P % 2 for n in (0, 1))


def int4_fits(out_features: int, in_features: int, group: int) -> bool:
    """Whether the kernels run here and take an int4 weight of this shape and group."""
    return fits(out_features, in_features) and in_features % 8 == 0 and group % 8 == 0


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 [N, K] in 0..15, scales and offsets [N, K / group] (weight = scale * code + offset) ->
    (codes [N/16, K/8, 64] uint8, two per byte in the kernel's order; params [N/16, K/group, 2, 16] bf16)."""
    n, k = codes.shape
    chunks = codes.reshape(n // 16, 16, k // 8, 8).transpose(1, 2)  # [N/16, K/8, output, input]
    packed = chunks[:, :, NIBBLE_OUTPUT, NIBBLE_INPUT[0]] | (chunks[:, :, NIBBLE_OUTPUT, NIBBLE_INPUT[1]] << 4)
    params = torch.stack([scales, offsets]).to(torch.bfloat16).reshape(2, n // 16, 16, -1).permute(1, 3, 0, 2)
    return packed.contiguous(), params.contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The codes [N, K] back from `pack_int4`'s layout ([B, K/8, 64] for B blocks of 16 outputs)."""
    blocks, k_chunks = packed.shape[:2]
    chunks = torch.empty(blocks, k_chunks, 16, 8, dtype=torch.uint8)
    chunks[:, :, NIBBLE_OUTPUT, NIBBLE_INPUT[0]] = packed & 15
    chunks[:, :, NIBBLE_OUTPUT, NIBBLE_INPUT[1]] = packed >> 4
    return chunks.transpose(1, 2).reshape(blocks * 16, k_chunks * 8)


# Output o's 4 bytes in each 64-byte chunk, in input order: their low nibbles hold inputs 0..3 of the chunk, their
# high nibbles inputs 4..7 (NIBBLE_OUTPUT[P] = o for these P).
_ROW_BYTES = torch.tensor([[16 * (o // 4) + 8 * h + 2 * (o % 4) + b for h in (0, 1) for b in (0, 1)]
                           for o in range(16)])


def int4_rows(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Codes of rows `ids` [len(ids), K], reading only their bytes (a tied embedding's lookup, every step)."""
    chunks = packed[ids // 16]  # [n, K/8, 64]
    picked = chunks.gather(2, _ROW_BYTES.to(ids.device)[ids % 16][:, None, :].expand(-1, chunks.shape[1], -1))
    return torch.cat([picked & 15, picked >> 4], dim=2).reshape(len(ids), -1)


def int4_params(params: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, offsets) [N, K / group] back from `pack_int4`'s params, or of rows `ids` only ([len(ids),
    K / group], reading just those: a tied embedding's lookup)."""
    if ids is not None:
        rows = params[ids // 16, :, :, ids % 16]  # [len(ids), K / group, 2]
        return rows[..., 0], rows[..., 1]
    both = params.permute(2, 0, 3, 1).reshape(2, params.shape[0] * 16, params.shape[1])
    return both[0], both[1]


def _output(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    return x2, torch.empty(x2.shape[0], n, dtype=torch.bfloat16)


def gemm_bf16(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] bf16 @ W^T (+ bias) with W packed by `pack_bf16`; returns [..., N] bf16."""
    n = packed.shape[0] * 16
    x2, y = _output(x, n)
    _lib.workbench_gemm_bf16(x2.data_ptr(), packed.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                             x2.shape[0], n, x2.shape[1], torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


def read_f32(buffer: torch.Tensor, threads: int) -> float:
    """The sum of a contiguous float32 buffer, read on `threads` threads the way the products stream their
    weights (64-byte loads, each thread one contiguous range, prefetched): the read ceiling they are measured
    against."""
    return _lib.workbench_read_f32(buffer.data_ptr(), buffer.numel(), threads)


def gemm_int8(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
              int8_activations: bool = False) -> torch.Tensor:
    """x [..., K] bf16 @ (codes * scales[:, None])^T (+ bias), codes packed by `pack_int8` and scales float32 [N].
    `int8_activations`: x rounded to int8 per block of 32 inputs (`quantize_rows_q8`), integer dot products."""
    n = packed.shape[0] * 16
    x2, y = _output(x, n)
    run = _lib.workbench_gemm_int8_a8 if int8_activations else _lib.workbench_gemm_int8
    run(x2.data_ptr(), packed.data_ptr(), scales.data_ptr(),
                             0 if bias is None else bias.data_ptr(), y.data_ptr(), x2.shape[0], n, x2.shape[1],
                             torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


def gemm_int4(x: torch.Tensor, packed: torch.Tensor, params: torch.Tensor, group: int,
              bias: torch.Tensor | None, int8_activations: bool = False) -> torch.Tensor:
    """x [..., K] bf16 @ (scale * code + offset)^T (+ bias), codes and params packed by `pack_int4`.
    `int8_activations`: x rounded to int8 per block of 32 inputs (`quantize_rows_q8`), integer dot products."""
    n = packed.shape[0] * 16
    x2, y = _output(x, n)
    run = _lib.workbench_gemm_int4_a8 if int8_activations else _lib.workbench_gemm_int4
    run(x2.data_ptr(), packed.data_ptr(), params.data_ptr(), group,
                             0 if bias is None else bias.data_ptr(), y.data_ptr(), x2.shape[0], n, x2.shape[1],
                             torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


def quantize_rows_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C kernels' int8 activations of x [M, K] bf16: codes int8 [M, K], float32 scales and int32 code sums
    [M, K / 32]; a block's codes are round(x * (127 / amax)), its scale amax / 127."""
    x = x.contiguous()
    m, k = x.shape
    codes = torch.empty(m, k, dtype=torch.int8)
    scales = torch.empty(m, k // A8_BLOCK, dtype=torch.float32)
    sums = torch.empty(m, k // A8_BLOCK, dtype=torch.int32)
    _lib.workbench_quantize_rows_q8(x.data_ptr(), m, k, codes.data_ptr(), scales.data_ptr(), sums.data_ptr())
    return codes, scales, sums


def attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attention` runs here and takes these: bf16 on the CPU, head size a multiple of 16 up to 256,
    rows of k and v contiguous."""
    dim = q.shape[-1]
    return (available() and q.is_cpu and q.dtype == k.dtype == v.dtype == torch.bfloat16 and dim % 16 == 0
            and dim <= 256
            and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of a few query rows over a cache, grouped kv heads, in one call.

    q: [T, heads, dim] (any strides but the last); k, v: [kv_heads, S, dim] (e.g. a view of a larger buffer);
    mask: [T, S] bool (True = visible) or None. Returns [T, heads * dim] bf16, scale 1/sqrt(dim)."""
    n, heads, dim = q.shape
    kv_heads, length = k.shape[0], k.shape[1]
    out = torch.empty(n, heads * dim, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    scratch = _attention_scratch(heads, kv_heads, n, length, dim, threads)
    visible = None if mask is None else mask.contiguous()
    _lib.workbench_attention_bf16(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
                                  v.data_ptr(), v.stride(0), v.stride(1),
                                  0 if visible is None else visible.data_ptr(), out.data_ptr(),
                                  heads, kv_heads, n, length, dim, dim**-0.5, scratch.data_ptr(), threads)
    return out


def _attention_scratch(heads: int, kv_heads: int, rows: int, keys: int, dim: int, threads: int) -> torch.Tensor:
    """The float32 scratch `workbench_attention_bf16` needs for these shapes, whichever unit runs it."""
    return torch.empty(_lib.workbench_attention_scratch(heads, kv_heads, rows, keys, dim, threads), dtype=torch.float32)


def rows_fit(x: torch.Tensor) -> bool:
    """Whether `rms_norm` and `swiglu` run here and take x: bf16 on the CPU, contiguous, last dim a multiple of 16."""
    return available() and x.is_cpu and x.dtype == torch.bfloat16 and x.is_contiguous() and x.shape[-1] % 16 == 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of each row of x [..., D] (of x + delta when given, for a residual add): returns
    (x or x + delta, its norm), both bf16; float32 inside, one rounding."""
    d = x.shape[-1]
    total = x if delta is None else torch.empty_like(x)
    y = torch.empty_like(x)
    _lib.workbench_rms_norm_bf16(x.data_ptr(), 0 if delta is None else delta.contiguous().data_ptr(),
                                 total.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // d, d, eps)
    return total, y


def topk_fits(x: torch.Tensor, k: int) -> bool:
    """Whether `topk` runs here and takes x: 2-D float32 on the CPU, contiguous, at least k columns."""
    return (available() and x.is_cpu and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()
            and 0 < k <= x.shape[1])


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of x [R, V] float32 (no NaN), descending, and their indices; equal values
    in index order, so k = 1 gives torch.argmax's index."""
    rows, n = x.shape
    values = torch.empty(rows, k, dtype=torch.float32)
    indices = torch.empty(rows, k, dtype=torch.long)
    _lib.workbench_topk_f32(x.data_ptr(), rows, n, k, values.data_ptr(), indices.data_ptr())
    return values, indices


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused gate|up product [..., 2I] -> [..., I] bf16."""
    i = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], i, dtype=torch.bfloat16)
    _lib.workbench_swiglu_bf16(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * i), i)
    return out


def rope_fits(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> bool:
    """Whether `rope` runs here and takes x [T, heads, D] (heads contiguous within a row, D a multiple of 32)
    and the tables."""
    t, heads, d = x.shape
    return (available() and x.is_cpu and x.dtype == cos.dtype == signed_sin.dtype == torch.bfloat16 and d % 32 == 0
            and x.stride(2) == 1 and x.stride(1) == d and cos.is_contiguous() and signed_sin.is_contiguous()
            and cos.numel() == signed_sin.numel() == t * d)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [T, heads, D] in the half layout: x * cos + roll(x, D/2) * signed_sin, tables
    [T, 1, D]; returns a new contiguous [T, heads, D] bf16."""
    t, heads, d = x.shape
    out = torch.empty(t, heads, d, dtype=torch.bfloat16)
    _lib.workbench_rope_bf16(x.data_ptr(), x.stride(0), cos.data_ptr(), signed_sin.data_ptr(), out.data_ptr(),
                             t, heads, d)
    return out


class KernelWeight(NamedTuple):
    """A product's weight as `decoder_layers` takes it: packed by `pack_bf16` (no aux), `pack_int8` (aux: the
    float32 row scales) or `pack_int4` (aux: its params; group: inputs per scale and offset); `int8_activations`:
    multiplied by int8 activations (`gemm_int8` and `gemm_int4` with `int8_activations`)."""

    packed: torch.Tensor
    aux: torch.Tensor | None = None
    group: int = 0
    int8_activations: bool = False


LAYER_ARGS = 24  # int64 values per layer in `decoder_layers`' table (C: LAYER_ARGS)
_PAST = 22  # where a row holds its layer's cached keys


def layer_weight_args(norms: tuple[torch.Tensor, torch.Tensor], weights: list[KernelWeight]) -> list[int]:
    """The first part of a layer's row of `decoder_layers`' table, from its weights (the same every step).
    norms: (attention, MLP) RMSNorm weights; weights: the q|k|v, o, gate|up and down products' (no biases)."""
    return [norms[0].data_ptr(), norms[1].data_ptr(), *(w.packed.data_ptr() for w in weights),
            *(0 if w.aux is None else w.aux.data_ptr() for w in weights), *(w.group for w in weights),
            *(int(w.int8_activations) for w in weights)]


def layer_cache_args(k_cache: torch.Tensor, v_cache: torch.Tensor, past: int, visible: torch.Tensor | None
                     ) -> list[int]:
    """The rest of the row, from the step: k_cache, v_cache: [kv_heads, capacity, D] buffers whose slots past ..
    past + T - 1 receive the new keys and values; visible: [T, past + T] bool, contiguous, or None (all visible).
    The tensors must stay alive until the call."""
    return [k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), past,
            0 if visible is None else visible.data_ptr()]


def decoder_layers(x: torch.Tensor, layers: list[list[int]], eps: float, heads: int, kv_heads: int, dim: int,
                   inter: int, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Consecutive Llama decoder layers on x [T, Dm] in one call (each row `layer_weight_args` + `layer_cache_args`),
    bit for bit what each layer's separate kernel calls give: the same kernels in the same order, without
    returning to Python between layers. cos, signed_sin: [T, D] RoPE tables. Returns the last layer's output
    [T, Dm] bf16."""
    t, dm = x.shape
    out, spare = torch.empty_like(x), torch.empty_like(x)
    scratch = torch.empty(t * (2 * dm + 3 * (heads + kv_heads) * dim + 3 * inter), dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    table = torch.tensor(layers, dtype=torch.int64)
    assert table.shape[1] == LAYER_ARGS
    keys = int(table[:, _PAST].max()) + t  # the longest cache's keys
    attention_scratch = _attention_scratch(heads, kv_heads, t, keys, dim, threads)
    _lib.workbench_layers_bf16(x.data_ptr(), out.data_ptr(), spare.data_ptr(), len(layers), table.data_ptr(), eps,
                               t, dm, heads, kv_heads, dim, inter, cos.data_ptr(), signed_sin.data_ptr(), dim**-0.5,
                               scratch.data_ptr(), attention_scratch.data_ptr(), threads)
    return out
