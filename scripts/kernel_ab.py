"""One of the workbench's small CPU kernels on and off in the same process, alternating: forward time of 1 and
11 tokens (a prompt-lookup draft) after 100 cached ones, random weights of SmolLM2-135M's shapes, bf16.

    cd scripts && python kernel_ab.py rows    # RMSNorm (with the residual add) and SwiGLU
    cd scripts && python kernel_ab.py rope    # RoPE

Off means the layer takes its torch path (the check that picks the kernel answers no). Best of five 15-forward
means per side.
"""

import argparse
import time

import torch
from decode_step_breakdown import SHAPES

from workbench.decoding.base import DraftTree
from workbench.engine import build_cache
from workbench.kernels import cpu
from workbench.models.packed_linear import pack_linears
from workbench.models.random import random_model

CHECKS = {"rows": "rows_fit", "rope": "rope_fits"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=sorted(CHECKS))
    args = parser.parse_args()
    if not cpu.available():
        raise SystemExit("the workbench's CPU kernels do not run here (no C compiler or no AVX512-BF16)")
    check = CHECKS[args.kernel]
    on = getattr(cpu, check)
    model = random_model("smollm", dtype=torch.bfloat16, **SHAPES)
    pack_linears(model)
    cache = build_cache(model, [], 1024)
    with torch.inference_mode():
        model(torch.arange(100), torch.arange(100), cache)
        cache.commit()
        for drafted in (0, 10):
            tree = DraftTree.chain(list(range(5, 5 + drafted)))
            tokens, positions = torch.tensor([7, *tree.tokens]), tree.positions(100)
            mask = tree.attention_mask() if drafted else None
            best = {"kernel": float("inf"), "torch": float("inf")}
            for _ in range(5):
                for side in best:
                    setattr(cpu, check, on if side == "kernel" else (lambda *a: False))
                    for _ in range(2):
                        model(tokens, positions, cache, mask=mask)
                        cache.rollback()
                    start = time.perf_counter()
                    for _ in range(15):
                        model(tokens, positions, cache, mask=mask)
                        cache.rollback()
                    best[side] = min(best[side], (time.perf_counter() - start) / 15 * 1e3)
            setattr(cpu, check, on)
            print(f"{drafted + 1:>2} tokens: kernel {best['kernel']:.2f} ms, torch {best['torch']:.2f} ms")


if __name__ == "__main__":
    main()
