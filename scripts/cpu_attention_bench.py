"""The CPU attention kernel alone: 1, 4 and 11 query rows over 450 cached keys, SmolLM2-135M's heads (9 query
heads over 3 kv heads, 64 dims), bf16, a strided view of a larger cache buffer as the cache passes it; best of
five 300-call means, in microseconds. To compare two versions of `kernels/cpu_gemm.c`, run it at each.

    python scripts/cpu_attention_bench.py
"""

import time

import torch

from workbench.kernels import cpu


def main() -> None:
    if not cpu.available():
        raise SystemExit("the workbench's CPU kernels do not run here (no C compiler or no AVX512-BF16)")
    torch.manual_seed(0)
    keys = 450
    for rows in (1, 4, 11):
        q = torch.randn(rows, 9, 64).bfloat16()
        k, v = (torch.randn(3, 1024, 64).bfloat16()[:, :keys] for _ in range(2))
        mask = torch.ones(rows, keys, dtype=torch.bool) if rows > 1 else None
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(300):
                cpu.attention(q, k, v, mask)
            best = min(best, (time.perf_counter() - start) / 300 * 1e6)
        print(f"{rows:>2} rows over {keys} keys: {best:.1f} us")


if __name__ == "__main__":
    main()
