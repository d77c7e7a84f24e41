"""How fast layer-skipping self-speculation could possibly be on this machine: the speed-up it would reach
if every drafted token were accepted, and the per-token acceptance rate it needs to reach a target speed-up.

Measures, on random weights of SmolLM2-135M's shapes (speed does not depend on the values), bf16, packed
linears, 100 cached tokens: t1, one plain decode step; d(r), one draft step running a fraction 1 - r of the
layers (plus the head); v(n), one verification forward over a chain of n tokens. A step drafting k tokens
costs k * d(r) + v(k + 1) and commits (1 - a^(k + 1)) / (1 - a) tokens on average when each drafted token is
accepted with probability a (independently), against one token per t1 for plain decoding.

    python scripts/self_speculation_bound.py [--target 1.15]
"""

import argparse
import time

import torch
from decode_step_breakdown import SHAPES

from workbench.decoding.base import DraftTree
from workbench.engine import build_cache
from workbench.models.packed_linear import pack_linears
from workbench.models.random import random_model

CONTEXT = 100


def mean_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats * 1e3)
    return best


def tokens_per_step(a: float, k: int) -> float:
    return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def needed_rate(speedup: float, cost_ratio: float, k: int) -> float | None:
    """Smallest per-token acceptance rate a with tokens_per_step(a, k) >= speedup * cost_ratio (bisection)."""
    goal = speedup * cost_ratio
    if goal > k + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens_per_step(mid, k) < goal else (lo, mid)
    return hi


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", type=float, default=1.15, help="speed-up to find the needed acceptance for")
    args = parser.parse_args()
    model = random_model("smollm", dtype=torch.bfloat16, **SHAPES)
    pack_linears(model)
    n_layers = model.config.num_layers
    cache = build_cache(model, [], 1024)
    with torch.inference_mode():
        model(torch.arange(CONTEXT), torch.arange(CONTEXT), cache)
        cache.commit()

        def forward(n: int, layers: list[int] | None = None):
            tree = DraftTree.chain(list(range(5, 4 + n)))
            tokens = torch.tensor([7, *tree.tokens])
            model(tokens, tree.positions(CONTEXT), cache, mask=tree.attention_mask() if n > 1 else None,
                  layers=layers)
            cache.rollback()

        t1 = mean_ms(lambda: forward(1))
        verify = {n: mean_ms(lambda n=n: forward(n)) for n in range(2, 10)}
        print(f"plain step t1 = {t1:.2f} ms; verification of n tokens: "
              + ", ".join(f"{n}: {ms:.2f}" for n, ms in verify.items()))
        print(f"\n{'skipped':>8}{'draft step':>12}{'best k':>8}{'bound (all accepted)':>22}"
              f"{f'rate needed for {args.target}x':>28}")
        for ratio in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
            skipped = round(ratio * n_layers)
            plan = [i for i in range(n_layers) if not (n_layers - skipped) // 2 <= i < (n_layers + skipped) // 2]
            d = mean_ms(lambda plan=plan: forward(1, plan))
            rows = []
            for k in range(1, 9):
                cost = (k * d + verify[k + 1]) / t1
                rows.append(((k + 1) / cost, k, needed_rate(args.target, cost, k)))
            bound, k, _ = max(rows)
            rates = [r for _, _, r in rows if r is not None]
            need = f"{min(rates):.2f}" if rates else "unreachable"
            print(f"{skipped:>5}/{n_layers}{d:>10.2f}ms{k:>8}{bound:>21.2f}x{need:>28}")


if __name__ == "__main__":
    main()
