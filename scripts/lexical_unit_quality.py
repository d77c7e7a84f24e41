"""Lexical-unit acceptance against plain decoding and the lossless draft it rides on, interleaved in one process.

For the first prompt of each suite category, plain decoding, `decode=draft_model` (lossless matching) and
`decode=draft_model;accept=lexical_unit` at each threshold generate greedily one after the other. Per run:
decode speed and its ratio to plain's on the same prompt, tokens per target forward, and token agreement with
plain decoding (the share of positions whose token equals plain's, and the first position where they part).
The target's perplexity of the output is not measured here.

    .venv/bin/python scripts/lexical_unit_quality.py --new-tokens 32 --out docs/results/lexical_unit.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from tqdm import tqdm

from workbench import Workbench
from workbench.eval.quality import encode
from workbench.eval.suite import suite


def agreement(tokens: list[int], plain: list[int]) -> tuple[float, int]:
    same = [a == b for a, b in zip(tokens, plain)]
    first = next((i for i, s in enumerate(same) if not s), len(same))
    return sum(same) / max(len(plain), 1), first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--draft", default="draft_model:layers=8", help="the drafter, as a decode spec value")
    p.add_argument("--thresholds", default="0.9,0.6")
    p.add_argument("--categories", default="", help="suite categories, comma-separated (all by default)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    wb = Workbench(args.model, dtype=args.dtype)
    draft = args.draft
    specs = {"plain": "decode=plain", "draft (lossless)": f"decode={draft}"}
    for t in args.thresholds.split(","):
        specs[f"lexical_unit {t}"] = f"decode={draft};accept=lexical_unit:threshold={t}"
    loaded = wb.model(wb.spec())
    rows = []
    for item in tqdm(suite(args.categories.split(",") if args.categories else None, per_category=1), desc="prompts"):
        plain = None
        prompt, chat = item.prompt, {}
        if not loaded.tokenizer:  # a model without a tokenizer reads the prompt's UTF-8 bytes, given as ids
            text = item.prompt if isinstance(item.prompt, str) else "\n".join(m["content"] for m in item.prompt)
            prompt, chat = " ".join(map(str, encode(loaded, text))), {"chat": False}
        for name, spec in specs.items():
            trace = wb.generate(prompt, spec, max_new_tokens=args.new_tokens, temperature=0.0, **chat)
            s = trace.summary()
            plain = plain or (trace, s)
            share, first = agreement(trace.token_ids, plain[0].token_ids)
            rows.append({"id": item.id, "category": item.category, "technique": name, "spec": spec,
                         "decode_tok_per_s": s["decode_tok_per_s"],
                         "speedup": s["decode_tok_per_s"] / plain[1]["decode_tok_per_s"],
                         "tokens_per_forward": s["mean_accepted_length"], "agreement": share,
                         "first_divergence": first})
            print(f"{item.id:18} {name:18} speed-up {rows[-1]['speedup']:.2f} tokens/forward "
                  f"{rows[-1]['tokens_per_forward']:.2f} agreement {share:.2f} first divergence {first}", flush=True)
    summary = {name: {"median_speedup": statistics.median(r["speedup"] for r in rows if r["technique"] == name),
                      "mean_agreement": statistics.mean(r["agreement"] for r in rows if r["technique"] == name),
                      "mean_tokens_per_forward": statistics.mean(r["tokens_per_forward"] for r in rows
                                                                 if r["technique"] == name)}
               for name in specs}
    print(json.dumps(summary, indent=1))
    if args.out:
        out = {"command": "scripts/lexical_unit_quality.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                      for k, v in vars(args).items() if v),
               "load_average": os.getloadavg(), "summary": summary, "rows": rows}
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
