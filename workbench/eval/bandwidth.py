"""The machine's memory read bandwidth, measured the way a decoding step reads its weights.

Method (a STREAM-style read; McCalpin's STREAM benchmark times kernels over arrays much larger than the
caches): a float32 buffer is filled with ones once (so every page is mapped), then read whole by the C
kernels' read kernel (`workbench_read_f32` in kernels/cpu_gemm.c): each thread sums its own contiguous range
with 64-byte AVX-512 loads, prefetched as far ahead as the matrix products prefetch their weights, eight
independent sums and no other work per byte. So it streams at least as fast as the products can, which makes
it their ceiling; the sum of ones must equal the buffer's length, the check that every value was read. One
repeat's figure is the buffer's bytes over the read's wall time; `repeats` of them give the median and the
spread (lowest, highest). `torch.sum` over the same buffer is the second method (and the only one where the
C kernels do not run); it reads slower than the products on this project's machine (docs/performance.md), so
it is no ceiling for them.

A buffer much larger than the last-level cache measures main memory; a buffer the size of a decoding step's
bytes measures the rate at which that many bytes can be read again and again, from wherever the machine keeps
them (on CPUs with a large shared L3 part or all of a small model's weights stays in cache between steps,
which a main-memory figure ignores). `workbench bench --roofline` measures both, interleaved with the
decoding it compares them to.

Left out: STREAM's copy, scale and triad kernels (decoding reads weights; it does not write them) and
non-temporal loads.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.kernels import cpu

METHODS = ("kernel", "torch.sum")  # the C kernels' read, torch's sum

MIN_BYTES = 4096
FALLBACK_CACHE_BYTES = 32 * 2**20  # where the OS does not say how large the last-level cache is


@dataclass
class Bandwidth:
    """Read bandwidth over a buffer of `buffer_bytes` by `method`, one figure per repeat (GB/s, 1 GB = 1e9 bytes)."""

    buffer_bytes: int
    threads: int
    method: str = "kernel"
    samples: list[float] = field(default_factory=list)

    def add(self, other: Bandwidth) -> None:
        """Pool another measurement of the same buffer size (repeats interleaved with other work)."""
        self.samples.extend(other.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.samples), max(self.samples)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.spread
        return {**asdict(self), "median_gb_s": self.median, "low_gb_s": low, "high_gb_s": high}


def last_level_cache_bytes() -> int:
    """The largest CPU cache the OS reports (Linux sysfs), or 32 MiB where it reports none."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=FALLBACK_CACHE_BYTES)


def main_memory_buffer_bytes() -> int:
    """A buffer twice the last-level cache: most of each read of it comes from main memory."""
    return 2 * last_level_cache_bytes()


class ReadBuffer:
    """A float32 buffer of about `nbytes`, allocated and touched once, to be read repeatedly."""

    def __init__(self, nbytes: int):
        if nbytes < MIN_BYTES:
            raise WorkbenchError(f"a bandwidth buffer needs at least {MIN_BYTES} bytes, not {nbytes}")
        self.data = torch.ones(nbytes // 4, dtype=torch.float32)
        self.nbytes = self.data.numel() * 4

    def measure(self, repeats: int = 5, method: str | None = None) -> Bandwidth:
        """`repeats` timed reads of the whole buffer (after one untimed one, which warms the threads) by `method`:
        "kernel" (the default where the C kernels run) or "torch.sum"."""
        method = method or default_method()
        if method not in METHODS:
            raise WorkbenchError(f"unknown bandwidth method {method!r}; valid: {', '.join(METHODS)}")
        if method == "kernel" and not cpu.available():
            raise WorkbenchError(f"the kernel read needs the C kernels, which do not run here: "
                                 f"{cpu.unavailable_reason()}; use torch.sum")
        if repeats < 1:
            raise WorkbenchError(f"bandwidth repeats must be at least 1, not {repeats}")
        threads = torch.get_num_threads()
        read = ((lambda: cpu.read_f32(self.data, threads)) if method == "kernel"
                else (lambda: self.data.sum().item()))
        result = Bandwidth(self.nbytes, threads, method)
        total = read()  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            total = read()
            seconds = time.perf_counter() - t0
            result.samples.append(self.nbytes / seconds / 1e9)
        if abs(total / self.data.numel() - 1) > 1e-3:  # every element was read: a sum of ones is their count
            raise RuntimeError("the bandwidth buffer's sum is wrong: the read did not cover the buffer")
        return result


def default_method() -> str:
    """The C kernels' read where they run, else torch.sum."""
    return "kernel" if cpu.available() else "torch.sum"


def read_bandwidth(nbytes: int, repeats: int = 5, method: str | None = None) -> Bandwidth:
    """The read bandwidth over a fresh buffer of `nbytes` (see the module's docstring for the method)."""
    return ReadBuffer(nbytes).measure(repeats, method)
