"""Long-context drafters (TriForce, LongSpec, a SpecMemo budget) against plain decoding on the long-context suite.

For every prompt of `workbench.eval.long_context` (passkey, key-value retrieval, summarization at each length),
plain decoding and each drafter generate greedily from the same prompt one after the other, in one process; per
run: tokens per target forward, the tree's mean size, decode speed (tokens after the first / time after the
prefill), whether the tokens equal plain decoding's, and the answer's score (retrieval accuracy, or topic coverage
for summaries). Speed-ups are the drafter's decode speed over plain's on the same prompt, then the median per
length.

    .venv/bin/python scripts/long_context_drafters.py --lengths 2048,4096,7168 --new-tokens 32 \
        --out docs/results/long_context_drafters.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

from tqdm import tqdm

from workbench import Workbench
from workbench.eval.long_context import TASKS, long_context_suite, score, summarize_scores, token_counter
from workbench.eval.quality import decode as decode_ids
from workbench.eval.quality import encode

# token recycling with and without SpecMemo's memory budget (2 MB on the embedded model in float32: the root and
# three nodes at 2k tokens, two at 4k, one at 7k; its tree has five)
DRAFTERS = ("triforce", "prompt_lookup", "longspec", "token_recycling", "token_recycling:budget_mb=2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--lengths", default="2048,4096,7168", help="prompt lengths in tokens, comma-separated")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--per-cell", type=int, default=1, help="prompts per (task, length)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--drafters", default=" ".join(DRAFTERS), help="decode specs, space-separated")
    p.add_argument("--out", default="")
    args = p.parse_args()
    wb = Workbench(args.model, dtype=args.dtype)
    loaded = wb.model(wb.spec())
    suite = long_context_suite(token_counter(loaded), [int(n) for n in args.lengths.split(",")],
                               args.tasks.split(","), args.per_cell)
    drafters = args.drafters.split()
    rows = []
    for item in tqdm(suite, desc="long-context prompts"):
        plain = None
        for decode in ["plain", *drafters]:
            # a model without a tokenizer reads the prompt's UTF-8 bytes, given as ids
            text = item.prompt if loaded.tokenizer else " ".join(map(str, encode(loaded, item.prompt)))
            trace = wb.generate(text, f"decode={decode}", chat=False, max_new_tokens=args.new_tokens,
                                temperature=0.0)
            answer = trace.text if loaded.tokenizer else decode_ids(loaded, trace.token_ids)
            s = trace.summary()
            plain = plain or (trace, s)
            rows.append({"id": item.id, "task": item.task, "length": item.length, "decode": decode,
                         "prompt_tokens": len(trace.prompt_ids), "new_tokens": s["n_new_tokens"],
                         "tokens_per_forward": s["mean_accepted_length"], "prefill_s": s["prefill_s"],
                         "mean_tree_nodes": sum(e.n_drafted for e in trace.events[1:]) / max(len(trace.events) - 1, 1),
                         "decode_tok_per_s": s["decode_tok_per_s"],
                         "speedup": s["decode_tok_per_s"] / plain[1]["decode_tok_per_s"],
                         "identical_to_plain": trace.token_ids == plain[0].token_ids,
                         "score": score(item, answer)})
            print(f"{item.id:22} {decode:14} tokens/forward {rows[-1]['tokens_per_forward']:.2f} "
                  f"decode {s['decode_tok_per_s']:.1f} tok/s speed-up {rows[-1]['speedup']:.2f} "
                  f"identical {rows[-1]['identical_to_plain']} score {rows[-1]['score']:.2f}", flush=True)
    summary = {}
    for decode in ["plain", *drafters]:
        mine = [r for r in rows if r["decode"] == decode]
        summary[decode] = {
            "by_length": {str(n): {"median_speedup": statistics.median(r["speedup"] for r in mine if r["length"] == n),
                                   "mean_tokens_per_forward": statistics.mean(r["tokens_per_forward"] for r in mine
                                                                              if r["length"] == n),
                                   "mean_tree_nodes": statistics.mean(r["mean_tree_nodes"] for r in mine
                                                                      if r["length"] == n)}
                          for n in sorted({r["length"] for r in mine})},
            "all_identical_to_plain": all(r["identical_to_plain"] for r in mine),
            "scores": summarize_scores(mine)}
    print(json.dumps(summary, indent=1))
    if args.out:
        result = {"command": "python scripts/long_context_drafters.py " + " ".join(
                      f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
                  "load_average": os.getloadavg(), "commit": _commit(), "summary": summary, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    main()
