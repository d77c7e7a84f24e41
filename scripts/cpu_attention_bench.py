"""The CPU attention kernel alone: 1, 4 and 11 query rows (`--rows`) over a cache of `--keys` keys (450 by default),
SmolLM2-135M's heads (9 query heads over 3 kv heads, 64 dims), bf16, a strided view of a larger cache buffer as
the cache passes it; best of five means, in microseconds per layer. `--layers 30` gives every call of a round
its own layer's keys and values, as a forward over the model's 30 layers does (at long caches they no longer
stay in the core's cache from one call to the next).

    python scripts/cpu_attention_bench.py [--keys 450] [--layers 1]
    python scripts/cpu_attention_bench.py --against other.c   # the same against another version of cpu_gemm.c
    python scripts/cpu_attention_bench.py --keys 7168 --layers 30 --rows 1,5,9,16 --units amx,avx512-bf16 \
        --json docs/results/cpu_attention.json  # the AMX kernel against the AVX-512 one (kernels.cpu.product_unit)

With `--against` or `--units`, both run in one process, alternating over four rounds, so the machine's drift hits
both alike (separate runs at different times disagreed by more than the difference).
"""

import argparse
import json
import statistics
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
    parser.add_argument("--rows", default="1,4,11", help="query rows to time, comma-separated")
    parser.add_argument("--units", help="comma-separated units to alternate: amx (the tiles, where the CPU has "
                        "them), avx512-bf16 (default: the process's own, kernels.cpu.product_unit())")
    parser.add_argument("--json", type=Path, help="also write the medians here")
    args = parser.parse_args()
    if not cpu.available():
        raise SystemExit("the workbench's CPU kernels do not run here (no C compiler or no AVX512-BF16)")
    own = cpu.product_unit()
    try:
        units = cpu.units_to_compare(args.units)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    builds = {"current": cpu._lib}
    if args.against:
        current = cpu.SOURCE
        cpu.SOURCE = args.against
        builds[args.against.name] = cpu._build()
        cpu.SOURCE = current
    variants = [(build, unit) for build in builds for unit in units]
    torch.manual_seed(0)
    times: dict[tuple[int, str, str], list[float]] = {}
    for round_ in range(4 if len(variants) > 1 else 1):
        for rows in (int(r) for r in args.rows.split(",")):
            q = torch.randn(rows, 9, 64).bfloat16()
            capacity = max(1024, args.keys)
            layers = [tuple(torch.randn(3, capacity, 64).bfloat16()[:, :args.keys] for _ in range(2))
                      for _ in range(args.layers)]
            mask = torch.ones(rows, args.keys, dtype=torch.bool) if rows > 1 else None
            for build, unit in variants if round_ % 2 == 0 else reversed(variants):
                cpu._lib = builds[build]
                cpu.use_amx(unit == "amx")
                times.setdefault((rows, build, unit), []).append(best_us(q, layers, mask))
    cpu._lib = builds["current"]
    cpu.use_amx(own == "amx")
    for (rows, build, unit), us in times.items():
        print(f"{rows:>2} rows over {args.keys} keys, {build}, {unit}: " + " ".join(f"{t:.1f}" for t in us) + " us")
    if args.json:
        medians = [{"rows": rows, "build": build, "unit": unit, "us_per_layer": round(statistics.median(us), 1)}
                   for (rows, build, unit), us in times.items()]
        args.json.write_text(json.dumps({"keys": args.keys, "layers": args.layers, "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
