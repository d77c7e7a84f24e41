"""Where a bf16 decode step's time goes on the CPU: the step with each part replaced by a no-op.

Random weights of SmolLM2-135M's shapes (the speed does not depend on the values), packed linears as the
Workbench runs them, 60 cached tokens. Prints the best of three 60-step timings per variant.

    python scripts/decode_step_breakdown.py
"""

import time

import torch

from workbench.decoding.base import DraftTree
from workbench.engine import build_cache
from workbench.kernels import dispatch
from workbench.models import llama
from workbench.models.packed_linear import pack_linears
from workbench.models.random import random_model

SHAPES = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)


def cached_model(cached: int = 100):
    """Random weights of SmolLM2-135M's shapes in bf16, packed as the Workbench runs them, with `cached` tokens
    committed to a dense cache: (model, cache)."""
    model = random_model("smollm", dtype=torch.bfloat16, **SHAPES)
    pack_linears(model)
    cache = build_cache(model, [], 1024)
    with torch.inference_mode():
        model(torch.arange(cached), torch.arange(cached), cache)
        cache.commit()
    return model, cache


def chain_inputs(drafted: int, cached: int):
    """Tokens, positions and mask of a verification forward: the pending token and a chain of `drafted`."""
    tree = DraftTree.chain(list(range(5, 5 + drafted)))
    return torch.tensor([7, *tree.tokens]), tree.positions(cached), tree.attention_mask() if drafted else None


@torch.inference_mode()
def forward_ms(model, cache, tokens, positions, mask, repeats: int = 15) -> float:
    """Mean ms of a forward over `tokens` after the cache's committed tokens (rolled back each time), after two
    warm-up forwards."""
    for _ in range(2):
        model(tokens, positions, cache, mask=mask)
        cache.rollback()
    start = time.perf_counter()
    for _ in range(repeats):
        model(tokens, positions, cache, mask=mask)
        cache.rollback()
    return (time.perf_counter() - start) / repeats * 1e3


def step_ms(model: llama.LlamaModel) -> float:
    cache = build_cache(model, [], 512)
    with torch.inference_mode():
        model(torch.arange(60), torch.arange(60), cache)
        cache.commit()
        token = torch.tensor([5])
        for i in range(20):
            model(token, torch.tensor([60 + i]), cache)
            cache.commit()
        best = float("inf")
        for _ in range(3):
            cache.rollback()
            start = time.perf_counter()
            for i in range(60):
                model(token, torch.tensor([80 + i]), cache)
                cache.commit()
            best = min(best, (time.perf_counter() - start) / 60 * 1e3)
            for layer in cache.layers:
                layer.truncate(80)
                layer.n_committed = 80
    return best


def main() -> None:
    model = random_model("smollm", dtype=torch.bfloat16, **SHAPES)
    pack_linears(model)
    ops = dispatch.kernels(torch.device("cpu"), torch.bfloat16)  # the operations the model's forwards take
    ops.fuses = lambda *args: False  # every layer on its own, so that each part can be left out
    full = step_ms(model)
    print(f"whole step: {full:.2f} ms")
    rms_norm, add_rms_norm, rope, attention, logits = ops.rms_norm, ops.add_rms_norm, ops.rope, llama.attention, \
        model.logits
    variants = {
        "RMSNorm (2 per layer)": lambda: (setattr(ops, "rms_norm", lambda x, w, eps: x),
                                          setattr(ops, "add_rms_norm", lambda x, d, w, eps: (x + d, x + d))),
        "RoPE": lambda: setattr(ops, "rope", lambda x, cos, sin: x),
        "attention + cache append": lambda: setattr(
            llama, "attention", lambda q, k, v, pos, cache, mask, ops: q.reshape(q.shape[0], -1)),
        "final norm + LM head": lambda: setattr(model, "logits", lambda x: x),
    }
    for name, remove in variants.items():
        remove()
        without = step_ms(model)
        print(f"without {name}: {without:.2f} ms  (so it costs {full - without:.2f} ms)")
        ops.rms_norm, ops.add_rms_norm, ops.rope, llama.attention, model.logits = rms_norm, add_rms_norm, rope, \
            attention, logits
    dispatch.reset()


if __name__ == "__main__":
    main()
