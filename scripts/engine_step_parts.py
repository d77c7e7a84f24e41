"""Where a decoding step's time goes in the engine, per technique, from the StepEvents' own timings: drafting,
the target's forward (verify) and everything after it (acceptance, cache commit, the event's summary, the
drafter's learning, cache statistics), per step; with the prefill's share of the run and ms per new token.

Greedy, 128 new tokens, the embedded model, the first N prompts of each suite category; techniques take turns
on each prompt, the order alternating, each with its own cross-run memory, after a warm-up outside the suite.

    python scripts/engine_step_parts.py plain token_recycling prompt_lookup [--per-category 3]
    python scripts/engine_step_parts.py plain triforce --long-context 7168 --task kv --new-tokens 32

With `--long-context N` the prompts are the long-context suite's (`workbench.eval.long_context`, one of `--task`
at N tokens, no chat template) instead of the prompt suite's.

To compare two versions of the code, run it under each with PYTHONPATH pointing at that tree, alternating.
"""

import argparse
from collections import Counter

from workbench.api import Workbench
from workbench.eval.long_context import TASKS, long_context_suite, token_counter
from workbench.eval.suite import suite

WARMUP = "Write a short poem about the sea."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("decode", nargs="+", help="techniques, as in `workbench bench --decode`")
    parser.add_argument("--per-category", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--long-context", type=int, default=0, help="prompt length in tokens (0: the prompt suite)")
    parser.add_argument("--task", default="kv", choices=TASKS, help="the long-context task, with --long-context")
    args = parser.parse_args()
    wb = Workbench()
    specs = {d: wb.spec(f"decode={d}", max_new_tokens=args.new_tokens) for d in args.decode}
    memories: dict[str, dict] = {d: {} for d in args.decode}
    for d in args.decode:
        wb.generate(WARMUP, specs[d], memory=memories[d])
    if args.long_context:
        prompts = [item.prompt for item in long_context_suite(token_counter(wb.model(wb.default)),
                                                                [args.long_context], [args.task], 1)]
    else:
        prompts = [item.prompt for item in suite(None, args.per_category)]
    totals = {d: Counter() for d in args.decode}
    for i, prompt in enumerate(prompts):
        for d in (args.decode if i % 2 == 0 else args.decode[::-1]):
            trace = wb.generate(prompt, specs[d], memory=memories[d], chat=False if args.long_context else None)
            t = totals[d]
            t["prefill"] += trace.events[0].verify_ns
            t["total"] += trace.summary()["total_s"] * 1e9
            for event in trace.events[1:]:
                t["steps"] += 1
                t["tokens"] += len(event.tokens)
                t["draft"] += event.draft_ns
                t["verify"] += event.verify_ns
                t["after"] += event.accept_ns
    print(f"{'technique':<24}{'steps':>7}{'tokens/step':>13}{'draft':>8}{'verify':>8}{'after':>8}"
          f"{'prefill share':>15}{'ms/token':>10}   (ms per step unless named)")
    for d, t in totals.items():
        per_step = {key: t[key] / t["steps"] / 1e6 for key in ("draft", "verify", "after")}
        print(f"{d:<24}{t['steps']:>7}{t['tokens'] / t['steps']:>13.2f}{per_step['draft']:>8.3f}"
              f"{per_step['verify']:>8.3f}{per_step['after']:>8.3f}{t['prefill'] / t['total']:>15.3f}"
              f"{t['total'] / t['tokens'] / 1e6:>10.3f}")


if __name__ == "__main__":
    main()
