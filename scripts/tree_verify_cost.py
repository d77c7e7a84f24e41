"""What verifying T tokens at once costs on the CPU: one forward over a chain of T tokens after 100 cached
ones, random weights of SmolLM2-135M's shapes, bf16, packed linears (best of three 15-forward means).

    python scripts/tree_verify_cost.py            # the current tree attention
    python scripts/tree_verify_cost.py --compare  # also the earlier float32 batched products, alternating
    python scripts/tree_verify_cost.py --tokens 1,2,4,7,11,13,17,25 --lm-head  # tree sizes; the LM head alone
    python scripts/tree_verify_cost.py --units amx,avx512-bf16 --json ../docs/results/tree_verify_cost.json
                                                  # the bf16 products on AMX tiles and on AVX512-BF16, alternating
"""

import argparse
import json
import time

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
    parser.add_argument("--tokens", default="1,2,4,8,16,32", help="token counts to time, comma-separated")
    parser.add_argument("--lm-head", action="store_true", help="also time the LM head's product alone at 1-4 rows "
                        "(what a draft head's guess costs: hydra and clover run one per tree depth)")
    parser.add_argument("--units", help="comma-separated units of the C kernels' bf16 products to alternate: amx, "
                        "avx512-bf16 (default: the process's own, kernels.cpu.product_unit())")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    from workbench.kernels import cpu

    own = cpu.product_unit()
    try:
        units = cpu.units_to_compare(args.units)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    attentions = {"fused SDPA": attention._grouped_attention}
    if args.compare:
        attentions["float32 products"] = float32_grouped_attention
    variants = [(unit, name, fn) for unit in units for name, fn in attentions.items()]
    model, cache = cached_model(100)
    rows = []
    for n in [int(t) - 1 for t in args.tokens.split(",")]:
        inputs = chain_inputs(n, 100)
        best = {(unit, name): float("inf") for unit, name, _ in variants}
        for _ in range(3):
            for unit, name, fn in variants:  # alternating, so drift hits them alike
                cpu.use_amx(unit == "amx")
                attention._grouped_attention = fn
                best[unit, name] = min(best[unit, name], forward_ms(model, cache, *inputs))
        cpu.use_amx(own == "amx")
        rows.append({"tokens": n + 1, **{f"{unit}, {name}": round(ms, 3) for (unit, name), ms in best.items()}})
        print(f"{n + 1:>3} tokens: " + ", ".join(f"{unit}, {name} {ms:.2f} ms" for (unit, name), ms in best.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cached_tokens": 100, "ms": rows}, f, indent=1)
    if args.lm_head:
        for count in (1, 2, 3, 4):
            print(f"LM head, {count} rows: {lm_head_ms(model, count):.2f} ms")


@torch.inference_mode()
def lm_head_ms(model, rows: int, repeats: int = 30) -> float:
    """Best of three `repeats`-call means of the LM head's product alone over `rows` states."""
    x = torch.randn(rows, model.config.hidden_size, dtype=torch.bfloat16)
    model.lm_head(x)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            model.lm_head(x)
        best = min(best, (time.perf_counter() - start) / repeats * 1e3)
    return best


if __name__ == "__main__":
    main()
