"""DFloat11's exponent decoder in C (`cpu_dfloat11.c`), for `workbench.compression.dfloat11` on the CPU.

Built on first use like the other CPU kernels (`cpu.build_library`: the system's C compiler, cached by the
source's hash), but on its own: it needs no AVX512, so it runs wherever a C compiler does. Where it cannot
(no compiler, `WORKBENCH_CPU_KERNELS=0`), `available()` is False and the layer keeps its torch decoder.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from workbench.kernels.cpu import build_library

SOURCE = Path(__file__).with_name("cpu_dfloat11.c")
_lib: ctypes.CDLL | None = None
_tried = False
_reason = ""


def available() -> bool:
    """Whether the C decoder runs here (built on first call)."""
    global _lib, _tried, _reason
    if not _tried:
        _tried = True
        if os.environ.get("WORKBENCH_CPU_KERNELS", "1") == "0":
            _reason = "the CPU kernels are switched off (WORKBENCH_CPU_KERNELS=0)"
        else:
            target, _reason = build_library(SOURCE)
            if target is not None:
                try:
                    _lib = ctypes.CDLL(str(target))
                except OSError as err:
                    _reason = f"the built library {target} could not be loaded ({err}); delete it to rebuild"
                else:
                    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
                    _lib.workbench_dfloat11_decode.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, ptr, ptr,
                                                               ctypes.c_int]
                    _lib.workbench_dfloat11_decode.restype = None
    return _lib is not None


def unavailable_reason() -> str:
    return "" if available() else _reason


def decode_bf16(words: torch.Tensor, offsets: torch.Tensor, first: torch.Tensor, entry: torch.Tensor, block: int,
                sign_mantissa: torch.Tensor) -> torch.Tensor:
    """The bf16 values of len(offsets) blocks of `block` weights: exponents decoded from `words` (int32, the
    bit stream with its padding word) from each block's bit offset (int32) through the canonical code table
    (`first` int32: codes left-justified to 12 bits, in order; `entry` int16: symbol | length << 8), joined with
    `sign_mantissa` uint8 [len(offsets) * block]. Returns bf16 [len(offsets) * block]."""
    if not available():
        raise RuntimeError(f"the C DFloat11 decoder does not run here: {_reason}")
    if not (words.is_cpu and words.dtype == torch.int32 and offsets.dtype == torch.int32):
        raise ValueError("words and offsets must be int32 CPU tensors (DFloat11Linear's buffers)")
    words, offsets, sign_mantissa = words.contiguous(), offsets.contiguous(), sign_mantissa.contiguous()
    if sign_mantissa.numel() != offsets.numel() * block:
        raise ValueError(f"{sign_mantissa.numel()} sign+mantissa bytes for {offsets.numel()} blocks of {block}")
    first, entry = first.to(torch.int32).contiguous(), entry.to(torch.int16).contiguous()
    out = torch.empty(offsets.numel() * block, dtype=torch.int16)
    _lib.workbench_dfloat11_decode(words.data_ptr(), offsets.data_ptr(), offsets.numel(), block,
                                   first.data_ptr(), entry.data_ptr(), first.numel(), sign_mantissa.data_ptr(),
                                   out.data_ptr(), torch.get_num_threads())
    return out.view(torch.bfloat16)
