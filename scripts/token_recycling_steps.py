"""How token recycling's steps end over the prompt suite: the share of steps whose draft tree is empty, and the
histogram of drafted tokens accepted per step, over the suite's second half (the first half warms the
hot-started matrix). Greedy, 128 new tokens, the embedded model.

    python scripts/token_recycling_steps.py                       # the default configuration
    python scripts/token_recycling_steps.py token_recycling:prompt=false
"""

import sys
from collections import Counter

from workbench.api import Workbench
from workbench.eval.suite import suite


def main() -> None:
    decode = sys.argv[1] if len(sys.argv) > 1 else "token_recycling"
    wb = Workbench()
    spec = wb.spec(f"decode={decode}", max_new_tokens=128)
    prompts = suite(None, 10)
    memory: dict = {}
    accepted, empty, steps = Counter(), 0, 0
    for i, item in enumerate(prompts):
        trace = wb.generate(item.prompt, spec, memory=memory)
        if i < len(prompts) // 2:
            continue
        for event in trace.events[1:]:
            steps += 1
            empty += event.tree is None
            accepted[event.n_accepted] += 1
    print(f"{decode}: {steps} steps, empty trees {empty / steps:.0%}, drafted tokens accepted per step: "
          + ", ".join(f"{n}: {count / steps:.0%}" for n, count in sorted(accepted.items())))


if __name__ == "__main__":
    main()
