"""What verifying T tokens at once costs on the CPU: one forward over a chain of T tokens after 100 cached
ones, random weights of SmolLM2-135M's shapes, bf16, packed linears (mean of 20 forwards).

    python scripts/tree_verify_cost.py
"""

import time

import torch
from decode_step_breakdown import SHAPES

from workbench.decoding.base import DraftTree
from workbench.engine import build_cache
from workbench.models.packed_linear import pack_linears
from workbench.models.random import random_model


def main() -> None:
    model = random_model("smollm", dtype=torch.bfloat16, **SHAPES)
    pack_linears(model)
    cache = build_cache(model, [], 1024)
    with torch.inference_mode():
        model(torch.arange(100), torch.arange(100), cache)
        cache.commit()
        for n in (0, 1, 3, 7, 15, 31):
            tree = DraftTree.chain(list(range(5, 5 + n)))
            tokens, positions = torch.tensor([7, *tree.tokens]), tree.positions(100)
            mask = tree.attention_mask() if n else None
            for _ in range(3):
                model(tokens, positions, cache, mask=mask)
                cache.rollback()
            start = time.perf_counter()
            for _ in range(20):
                model(tokens, positions, cache, mask=mask)
                cache.rollback()
            print(f"{n + 1:>3} tokens: {(time.perf_counter() - start) / 20 * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
