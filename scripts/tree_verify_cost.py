"""What verifying T tokens at once costs on the CPU: one forward over a chain of T tokens after 100 cached
ones, random weights of SmolLM2-135M's shapes, bf16, packed linears (best of three 15-forward means).

    python scripts/tree_verify_cost.py            # the current tree attention
    python scripts/tree_verify_cost.py --compare  # also the earlier float32 batched products, alternating
"""

import argparse
import time

import torch
from decode_step_breakdown import SHAPES

import workbench.models.attention as attention
from workbench.decoding.base import DraftTree
from workbench.engine import build_cache
from workbench.models.packed_linear import pack_linears
from workbench.models.random import random_model


def float32_grouped_attention(q, k, v, mask):
    """The tree attention before the fused SDPA call: float32 batched products, grouped kv heads."""
    heads, n, dim = q.shape
    kv_heads, length = k.shape[0], k.shape[1]
    group = heads // kv_heads
    q, k, v, dtype = q.float(), k.float(), v.float(), q.dtype
    scores = (q * dim**-0.5).reshape(kv_heads, group * n, dim) @ k.transpose(1, 2)
    if mask is not None:
        scores = scores.view(kv_heads, group, n, length).masked_fill(~mask, float("-inf"))
        scores = scores.view(kv_heads, group * n, length)
    return (torch.softmax(scores, dim=-1) @ v).view(heads, n, dim).to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compare", action="store_true", help="also time the earlier float32 tree attention")
    args = parser.parse_args()
    variants = {"fused SDPA": attention._grouped_attention}
    if args.compare:
        variants["float32 products"] = float32_grouped_attention
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
            best = {name: float("inf") for name in variants}
            for _ in range(3):
                for name, fn in variants.items():  # alternating, so drift hits both alike
                    attention._grouped_attention = fn
                    for _ in range(2):
                        model(tokens, positions, cache, mask=mask)
                        cache.rollback()
                    start = time.perf_counter()
                    for _ in range(15):
                        model(tokens, positions, cache, mask=mask)
                        cache.rollback()
                    best[name] = min(best[name], (time.perf_counter() - start) / 15 * 1e3)
            print(f"{n + 1:>3} tokens: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in best.items()))


if __name__ == "__main__":
    main()
