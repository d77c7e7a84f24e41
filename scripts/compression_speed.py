"""Decode speed and weight bytes of weight-transform chains against the uncompressed model, in one run.

    .venv/bin/python scripts/compression_speed.py int8 int4:group=64,head=true --tokens 128 --repeats 3 \
        --json docs/results/compression_speed_cpu.json

Each chain is loaded once through `Workbench` (bf16 on the CPU: the uncompressed row uses oneDNN-packed bf16
weights, the fastest plain path). The configurations then take turns on the same prompts (greedy, EOS
ignored), so drift on a shared machine touches them all alike. Decode tok/s excludes the prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics

from workbench.api import Workbench, hardware_description
from workbench.eval.prompts import BASELINE_PROMPTS
from workbench.metrics import summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chains", nargs="+", help="compression chains, e.g. int8 or int4:group=64+eora:rank=16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    wb = Workbench(dtype="bfloat16", device="cpu")
    configs = {"bf16": "decode=plain"} | {c: f"decode=plain;compress={c}" for c in args.chains}
    specs = {name: wb.spec(s, max_new_tokens=args.tokens, ignore_eos=True, chat=False) for name, s in configs.items()}
    loaded = {name: wb.model(spec) for name, spec in specs.items()}  # apply every transform before timing
    speeds: dict[str, list[float]] = {name: [] for name in specs}
    for _ in range(args.repeats):
        for prompt in BASELINE_PROMPTS[: args.prompts]:
            for name, spec in specs.items():
                speeds[name].append(summarize(wb.generate(prompt, spec))["decode_tok_per_s"])
    base = statistics.median(speeds["bf16"])
    rows = []
    print(f"{'chain':<28} {'weight MB':>10} {'decode tok/s':>13} {'vs bf16':>8}")
    for name, values in speeds.items():
        median = statistics.median(values)
        mb = loaded[name].weight_bytes() / 1e6
        simulated = any(r.simulated for r in loaded[name].compression)
        rows.append({"chain": name, "weight_bytes": loaded[name].weight_bytes(), "decode_tok_per_s": median,
                     "speedup": median / base, "simulated_speed": simulated, "runs": values})
        print(f"{name:<28} {mb:>10.1f} {median:>13.1f} {median / base:>7.2f}x{' (simulated)' if simulated else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hardware": hardware_description(loaded["bf16"].device), "tokens": args.tokens,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
