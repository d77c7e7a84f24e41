"""Prompt lookup replayed offline: what its drafting rule could accept on the suite, at no verification cost.

A lossless drafter's output is plain decoding's, so once the plain outputs are known, each step's accepted
length follows from the drafting rule alone. This script generates them once (greedy, bf16, the embedded
model), then replays prompt lookup's rule (`workbench/decoding/prompt_lookup.py`: the longest of the last
3..1 tokens found earlier, its first occurrence, the next 7, 5 or 3 tokens after a 3-, 2- or 1-token match)
and variants of it, and reports per category: steps, the share whose first drafted token is rejected, tokens
per forward, and a modelled speed-up with each verified row costing `--row-cost` of a one-token forward and
each drafted step `--draft-cost` more (decode only, prefill excluded).

    python scripts/prompt_lookup_replay.py --categories summarization,code_edit
"""

import argparse
import collections

from workbench import Workbench
from workbench.eval.suite import suite


def candidates(context: list[int], k: int, count: int, shrink: int = 0, max_n: int = 3) -> list[tuple[int, ...]]:
    """Up to `count` distinct continuations of length <= k - shrink * (max_n - n) (at least 1) after earlier
    occurrences of the longest matching n-gram (n = max_n .. 1), first occurrences first: count = 1 is prompt
    lookup's own rule."""
    found: list[tuple[int, ...]] = []
    for n in range(max_n, 0, -1):
        if n > len(context) - 1:
            continue
        gram = context[-n:]
        length = max(1, k - shrink * (max_n - n))
        for start in range(len(context) - n):
            if context[start: start + n] == gram:
                follow = tuple(context[start + n: start + n + length])
                if follow and follow not in found:
                    found.append(follow)
                if len(found) == count:
                    return found
        if found:
            return found
    return found


def match_length(context: list[int], max_n: int = 3) -> int:
    """The longest n <= max_n whose last n tokens occurred earlier in the context, or 0."""
    for n in range(max_n, 0, -1):
        gram = context[-n:]
        if n < len(context) and any(context[s: s + n] == gram for s in range(len(context) - n)):
            return n
    return 0


def replay(prompt: list[int], output: list[int], k: int, count: int, shrink: int, row_cost: float,
           draft_cost: float, by_length: dict | None = None):
    """(steps, steps whose first drafted token is rejected, tokens generated, modelled cost in one-token forwards);
    with `by_length`, also adds [steps, drafted tokens accepted] per match length there."""
    sequence = prompt + output
    at = len(prompt) + 1  # the prefill chose the first output token
    steps = rejected = 0
    cost = 0.0
    while at < len(sequence):
        drafts = candidates(sequence[:at], k, count, shrink)
        nodes = len({c[: i + 1] for c in drafts for i in range(len(c))})
        accepted = 0
        for draft in drafts:
            m = 0
            while m < len(draft) and at + m < len(sequence) and draft[m] == sequence[at + m]:
                m += 1
            accepted = max(accepted, m)
        steps += 1
        rejected += accepted == 0
        if by_length is not None:
            entry = by_length.setdefault(match_length(sequence[:at]), [0, 0])
            entry[0] += 1
            entry[1] += accepted
        cost += 1 + row_cost * nodes + (draft_cost if drafts else 0.0)
        at += accepted + 1
    return steps, rejected, len(output) - 1, cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", default="summarization,code_edit")
    parser.add_argument("--row-cost", type=float, default=0.025, help="cost of each extra verified row, in "
                        "one-token forwards (measure it with scripts/tree_verify_cost.py)")
    parser.add_argument("--draft-cost", type=float, default=0.05, help="cost of a step's drafting and "
                        "acceptance beyond plain decoding's, in one-token forwards")
    args = parser.parse_args()
    wb = Workbench("smollm2-135m")
    outputs = collections.defaultdict(list)
    for item in suite(args.categories.split(",")):
        trace = wb.generate(item.prompt, "decode=plain")
        outputs[item.category].append((trace.prompt_ids, trace.token_ids))
    variants = {"k=10 (the papers')": (10, 1, 0), "k=5": (5, 1, 0), "k=7, shrink=2 (default)": (7, 1, 2),
                "k=16": (16, 1, 0), "3 matches, k=6": (6, 3, 0), "8 matches, k=8": (8, 8, 0)}
    print(f"{'category':<15}{'rule':<26}{'steps':>7}{'first rejected':>16}{'tokens/forward':>16}{'modelled':>10}")
    for category, runs in outputs.items():
        for name, (k, count, shrink) in variants.items():
            totals = [sum(r) for r in zip(*(replay(p, o, k, count, shrink, args.row_cost, args.draft_cost)
                                            for p, o in runs))]
            steps, rejected, tokens, cost = totals
            print(f"{category:<15}{name:<26}{steps:>7}{rejected / steps:>16.0%}{tokens / steps:>16.2f}"
                  f"{tokens / cost:>9.2f}x")
    print("\ndrafted tokens accepted per step, by the length of the match (k=10 drafts, one match)")
    for category, runs in outputs.items():
        by_length: dict = {}
        for p, o in runs:
            replay(p, o, 10, 1, 0, args.row_cost, args.draft_cost, by_length)
        print(f"{category:<15}" + "  ".join(f"{n}-token match: {count} steps, {total / count:.2f}"
                                           for n, (count, total) in sorted(by_length.items()) if n))


if __name__ == "__main__":
    main()
