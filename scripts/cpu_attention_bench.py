"""The CPU attention kernel alone: 1, 4 and 11 query rows over a cache of `--keys` keys (450 by default),
SmolLM2-135M's heads (9 query heads over 3 kv heads, 64 dims), bf16, a strided view of a larger cache buffer as
the cache passes it; best of five means, in microseconds per layer. `--layers 30` gives every call of a round
its own layer's keys and values, as a forward over the model's 30 layers does (at long caches they no longer
stay in the core's cache from one call to the next).

    python scripts/cpu_attention_bench.py [--keys 450] [--layers 1]
    python scripts/cpu_attention_bench.py --against other.c   # the same against another version of cpu_gemm.c

With `--against`, both builds run in one process, alternating over four rounds, so the machine's drift hits
both alike (separate runs at different times disagreed by more than the difference).
"""

import argparse
import time
from pathlib import Path

import torch

from workbench.kernels import cpu


def best_us(q, layers, mask) -> float:
    """Best of five means over about 300 calls, each layer's keys and values in turn, per call."""
    rounds = max(1, 300 // len(layers))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            for k, v in layers:
                cpu.attention(q, k, v, mask)
        best = min(best, (time.perf_counter() - start) / (rounds * len(layers)) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=450)
    parser.add_argument("--layers", type=int, default=1, help="layers whose keys and values the calls take in turn")
    parser.add_argument("--against", type=Path, help="another cpu_gemm.c to compare with the current one")
    args = parser.parse_args()
    if not cpu.available():
        raise SystemExit("the workbench's CPU kernels do not run here (no C compiler or no AVX512-BF16)")
    builds = {"current": cpu._lib}
    if args.against:
        current = cpu.SOURCE
        cpu.SOURCE = args.against
        builds[args.against.name] = cpu._build()
        cpu.SOURCE = current
    torch.manual_seed(0)
    times: dict[tuple[int, str], list[float]] = {}
    for round_ in range(4 if args.against else 1):
        for rows in (1, 4, 11):
            q = torch.randn(rows, 9, 64).bfloat16()
            capacity = max(1024, args.keys)
            layers = [tuple(torch.randn(3, capacity, 64).bfloat16()[:, :args.keys] for _ in range(2))
                      for _ in range(args.layers)]
            mask = torch.ones(rows, args.keys, dtype=torch.bool) if rows > 1 else None
            for name in builds if round_ % 2 == 0 else reversed(builds):
                cpu._lib = builds[name]
                times.setdefault((rows, name), []).append(best_us(q, layers, mask))
    cpu._lib = builds["current"]
    for (rows, name), us in times.items():
        print(f"{rows:>2} rows over {args.keys} keys, {name}: " + " ".join(f"{t:.1f}" for t in us) + " us")


if __name__ == "__main__":
    main()
