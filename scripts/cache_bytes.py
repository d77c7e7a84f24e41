"""KV-cache bytes per cache policy after a generation: what the process holds for the cache (`cache_bytes`: every
tensor storage of the cache, spare capacity and full-precision windows included) beside the live part (what the
held tokens take in their stored form), at the end and at the peak, with each as a share of dense's.

The prompt is the first N tokens of the evaluation text; greedy, EOS ignored, so every policy sees the same
context. No timing: bytes only.

    .venv/bin/python scripts/cache_bytes.py dense kivi:bits=2 kivi:bits=4 --prompt-tokens 410 --new-tokens 64 \\
        --json docs/results/cache_bytes.json
"""

from __future__ import annotations

import argparse
import json

from workbench.api import Workbench
from workbench.engine import Engine
from workbench.eval.quality import encode
from workbench.text import evaluation_text


def measure(wb: Workbench, cache: str, prompt: list[int], new_tokens: int) -> dict:
    spec = wb.spec(f"cache={cache}" if cache != "dense" else "", max_new_tokens=new_tokens, ignore_eos=True)
    loaded = wb.model(spec)
    engine = Engine(loaded.model, spec, [], loaded.detokenize, memory=wb.memory(spec), tokenizer=loaded.tokenizer)
    events = list(engine.run(prompt))
    last = events[-1]
    return {"cache": cache, "allocated_bytes": last.cache_bytes, "live_bytes": last.cache_live_bytes,
            "peak_allocated_bytes": max(e.cache_bytes for e in events),
            "peak_live_bytes": max(e.cache_live_bytes for e in events),
            "tokens_held_layer0": last.cache_tokens[0],
            "context": len(prompt) + sum(len(e.tokens) for e in events) - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("caches", nargs="+", help="cache specs as in --cache (dense = no policy); the first one is "
                                                  "the reference the shares are of")
    parser.add_argument("--prompt-tokens", type=int, default=410)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="model (default: the embedded one)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    wb = Workbench(**({"model": args.model} if args.model else {}))
    loaded = wb.model(wb.spec())
    prompt = encode(loaded, evaluation_text()[: args.prompt_tokens * 12])[: args.prompt_tokens]
    rows = [measure(wb, cache, prompt, args.new_tokens) for cache in args.caches]
    ref = rows[0]
    mb = 1e6
    print(f"{len(prompt)}-token prompt + {args.new_tokens} new tokens, {loaded.name}, {loaded.dtype}; "
          f"shares are of {ref['cache']}'s")
    print("| cache | tokens held | allocated MB | of ref | live MB | of ref | peak allocated MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| `{r['cache']}` | {r['tokens_held_layer0']} | {r['allocated_bytes'] / mb:.2f} | "
              f"{r['allocated_bytes'] / ref['allocated_bytes']:.1%} | {r['live_bytes'] / mb:.2f} | "
              f"{r['live_bytes'] / ref['live_bytes']:.1%} | {r['peak_allocated_bytes'] / mb:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": loaded.name, "dtype": str(loaded.dtype), "prompt_tokens": len(prompt),
                       "new_tokens": args.new_tokens, "rows": rows}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
