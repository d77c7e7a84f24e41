"""NVIDIA kvpress (PyPI `kvpress`) as a peer for the cache policies, under the same protocol.

The same weights run in transformers (`workbench.bench.transformers_peer`), in the workbench's dtype. Each
window is prefilled inside the press's context manager, which compresses every layer's cache right after
that layer's attention: the prefill's own logits used the full context, as ours do. The continuation is
then fed one token per step with explicit position ids (as kvpress's pipeline does), so RoPE positions
stay those of the text. Bytes are those of the tensors the DynamicCache holds.

Differences that stay (reported, not hidden): kvpress compresses at prefill only, so its cache grows by
one token per scored step where a policy of ours may keep evicting; its `compression_ratio` is the
fraction removed (1 - budget); `ObservedAttentionPress` averages the attention a token receives, while
H2O (ours) accumulates it and keeps a recent window, so that pair is marked approximate. The workbench's
dense cache also counts each token's logical position (8 bytes per kv head), which transformers does
not keep.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.eval.quality import Forced, kl_per_token, nll

# our policy -> (kvpress press, {press field: our policy's parameter}, is it the same method for this policy?)
PRESSES: dict[str, tuple[str, dict[str, str], Callable[[Any], bool]]] = {
    "streaming": ("StreamingLLMPress", {"n_sink": "sinks"}, lambda policy: True),
    "snapkv": ("SnapKVPress", {"window_size": "window", "kernel_size": "kernel"},
               lambda policy: getattr(policy, "pooling", "avg") == "avg"),  # kvpress pools by average only
    "h2o": ("ObservedAttentionPress", {}, lambda policy: False),  # averaged, not accumulated; no recent window
}
NEEDS_ATTENTIONS = {"ObservedAttentionPress"}  # presses that read the attention weights (eager attention)
# Smallest mean per-token gap (nats) counted as a disagreement between ours and the peer (see `agreement`).
AGREE_NATS = 0.005


def require_kvpress() -> Any:
    try:
        import kvpress
    except ImportError:
        raise WorkbenchError("the kvpress peer needs the `kvpress` package: pip install -e '.[peers]'") from None
    return kvpress


def press_for(name: str, policy: Any, budget: float) -> tuple[Any, bool] | None:
    """The kvpress press matching our policy `name` (built, with its parameters) at `budget`, and whether the
    two are the same method; None where kvpress has no counterpart."""
    if name not in PRESSES:
        return None
    press_name, fields, same = PRESSES[name]
    kvpress = require_kvpress()
    options = {theirs: getattr(policy, ours) for theirs, ours in fields.items() if hasattr(policy, ours)}
    return getattr(kvpress, press_name)(compression_ratio=1 - budget, **options), same(policy)


def cache_nbytes(cache: Any) -> int:
    """Real bytes of the key and value tensors a transformers cache holds."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


@torch.inference_mode()
def peer_forced(model: Any, press: Any | None, ids: Sequence[int], prefill: int) -> Forced:
    """The protocol of `workbench.eval.quality` on a transformers model with a kvpress press (None: full)."""
    from transformers import DynamicCache

    wanted = "eager" if press is not None and type(press).__name__ in NEEDS_ATTENTIONS else "sdpa"
    if model.config._attn_implementation != wanted:
        model.set_attn_implementation(wanted)
    device = model.device
    tokens = torch.tensor([list(ids)], device=device)
    cache = DynamicCache()
    with press(model) if press is not None else contextlib.nullcontext():
        # cache_position: kvpress's hooks read it to tell the prefill from decoding (newer transformers no
        # longer pass it to the attention layers unless given)
        rows = [model(input_ids=tokens[:, :prefill], past_key_values=cache, logits_to_keep=1,
                      cache_position=torch.arange(prefill, device=device)).logits[0]]
    bytes_prefill = cache_nbytes(cache)
    t0 = time.perf_counter()
    for i in range(prefill, len(ids) - 1):
        out = model(input_ids=tokens[:, i:i + 1], past_key_values=cache,
                    position_ids=torch.tensor([[i]], device=device))
        rows.append(out.logits[0, -1:])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    decode_s = time.perf_counter() - t0
    logprobs = torch.log_softmax(torch.cat(rows).float(), dim=-1).cpu()
    return Forced(logprobs, tokens[0, prefill:].cpu(), bytes_prefill, cache_nbytes(cache), decode_s)


@torch.inference_mode()
def peer_generate(model: Any, press: Any | None, ids: Sequence[int], new_tokens: int) -> tuple[list[int], int]:
    """Greedy continuation of `ids` by a transformers model whose prompt cache `press` compressed (None: full), fed
    one token per step with explicit position ids as in `peer_forced`. Returns (the new token ids, the cache's bytes
    after the prefill)."""
    from transformers import DynamicCache

    wanted = "eager" if press is not None and type(press).__name__ in NEEDS_ATTENTIONS else "sdpa"
    if model.config._attn_implementation != wanted:
        model.set_attn_implementation(wanted)
    device = model.device
    cache = DynamicCache()
    with press(model) if press is not None else contextlib.nullcontext():
        logits = model(input_ids=torch.tensor([list(ids)], device=device), past_key_values=cache, logits_to_keep=1,
                       cache_position=torch.arange(len(ids), device=device)).logits[0, -1]
    bytes_prefill = cache_nbytes(cache)
    out = [int(logits.argmax())]
    for i in range(len(ids), len(ids) + new_tokens - 1):
        logits = model(input_ids=torch.tensor([[out[-1]]], device=device), past_key_values=cache,
                       position_ids=torch.tensor([[i]], device=device)).logits[0, -1]
        out.append(int(logits.argmax()))
    return out, bytes_prefill


def _paired(x: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of per-token differences."""
    x = x.double()
    return float(x.mean()), float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else 0.0


def agreement(ours: list[Forced], peer: list[Forced], reference: list[Forced], peer_full: list[Forced]) -> dict:
    """Whether our policy and the peer's press give the same numbers, paired over the same tokens:

    - NLL: the per-token gap between ours and the peer, less the gap the two engines already have with
      full caches (`reference` is our dense run, `peer_full` the peer without a press);
    - KL against our reference: the per-token gap, allowing the KL the peer's full cache already has.

    Each agrees when its mean gap is within max(2 standard errors, AGREE_NATS) (+ that full-cache KL)."""
    nll_gap, nll_se = _paired(torch.cat([nll(o) - nll(p) - (nll(r) - nll(f))
                                         for o, p, r, f in zip(ours, peer, reference, peer_full)]))
    kl_gap, kl_se = _paired(torch.cat([kl_per_token(r, p) - kl_per_token(r, o)
                                       for o, p, r in zip(ours, peer, reference)]))
    floor = float(torch.cat([kl_per_token(r, f) for r, f in zip(reference, peer_full)]).mean())
    between = float(torch.cat([kl_per_token(o, p) for o, p in zip(ours, peer)]).mean())
    agrees = abs(nll_gap) <= max(2 * nll_se, AGREE_NATS) and abs(kl_gap) <= max(2 * kl_se, AGREE_NATS) + floor
    return {"nll_gap": nll_gap, "nll_gap_se": nll_se, "kl_gap": kl_gap, "kl_gap_se": kl_se,
            "kl_full_cache_floor": floor, "kl_ours_vs_peer": between, "agrees": agrees}
