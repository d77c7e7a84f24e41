"""The workbench's top-k kernel against torch's topk and argmax on float32 logits rows of SmolLM2's vocabulary
(49152), in microseconds (after three warm-up calls, the best of three means of 300 calls, 10 for 256 rows).

    python scripts/topk_bench.py
"""

import torch
from self_speculation_bound import mean_ms

from workbench.kernels import cpu

VOCAB = 49152


def best_us(fn, calls: int) -> float:
    return mean_ms(fn, calls) * 1e3


def main() -> None:
    if not cpu.available():
        raise SystemExit("the workbench's CPU kernels do not run here (no C compiler or no AVX512-BF16)")
    torch.manual_seed(0)
    print(f"{'rows':>5}{'k':>4}{'workbench':>11}{'torch.topk':>12}{'torch.argmax':>14}")
    for rows, k in ((1, 1), (1, 5), (6, 1), (6, 8), (12, 8), (256, 8)):
        x = torch.randn(rows, VOCAB)
        calls = 300 if rows < 100 else 10
        ours = best_us(lambda x=x, k=k: cpu.topk(x, k), calls)
        theirs = best_us(lambda x=x, k=k: torch.topk(x, k, dim=-1), calls)
        argmax = f"{best_us(lambda x=x: x.argmax(-1), calls):>14.1f}" if k == 1 else f"{'':>14}"
        print(f"{rows:>5}{k:>4}{ours:>11.1f}{theirs:>12.1f}{argmax}")


if __name__ == "__main__":
    main()
