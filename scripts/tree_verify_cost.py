"""What verifying T tokens at once costs on the CPU: one forward over a chain of T tokens after 100 cached
ones, random weights of SmolLM2-135M's shapes, bf16, packed linears (best of three 15-forward means).

    python scripts/tree_verify_cost.py            # the current tree attention
    python scripts/tree_verify_cost.py --compare  # also the earlier float32 batched products, alternating
"""

import argparse

import torch
from decode_step_breakdown import cached_model, chain_inputs, forward_ms

import workbench.models.attention as attention


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
    model, cache = cached_model(100)
    for n in (0, 1, 3, 7, 15, 31):
        inputs = chain_inputs(n, 100)
        best = {name: float("inf") for name in variants}
        for _ in range(3):
            for name, fn in variants.items():  # alternating, so drift hits both alike
                attention._grouped_attention = fn
                best[name] = min(best[name], forward_ms(model, cache, *inputs))
        print(f"{n + 1:>3} tokens: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in best.items()))


if __name__ == "__main__":
    main()
