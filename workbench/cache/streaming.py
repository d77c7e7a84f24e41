"""StreamingLLM: attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.base import KVCache
from workbench.cache.scores import BudgetEviction, context_length
from workbench.errors import SpecError
from workbench.registry import param, register


@register("cache", "streaming", lossless=False)
@dataclass
class StreamingPolicy(BudgetEviction):
    """StreamingLLM: the first few tokens (attention sinks) plus a window of the most recent ones.

    "Efficient Streaming Language Models with Attention Sinks" (arXiv 2309.17453). Softmax attention dumps
    much of its mass on the first tokens whatever they say; evicting them breaks the model, so the cache keeps
    `sinks` initial tokens and a rolling window of `window` recent ones, and drops the middle: a fixed cache
    size (the paper's 4 + 1020 by default), so memory is bounded however long the context grows (the evicted
    slots are given back). Enforced continuously, as in the paper (`continuous=false`: the prefill only): after
    the prefill and after every step, each layer holds at most sinks + window tokens (the same tokens in every
    head). `fraction` > 0 keeps that fraction of the context instead (sinks + the most recent rest). Left out:
    the paper assigns RoPE positions by place in the cache (positions stay the text's here, RoPE being applied
    before caching, as kvpress does).
    """

    sinks: int = param(4, "attention-sink tokens kept at the start of the context", min=0, max=1 << 20)
    window: int = param(1020, "most recent tokens kept (the rolling window)", min=0, max=1 << 20)
    fraction: float = param(0.0, "when above 0: keep this fraction of the context's tokens (sinks + the most recent "
                                  "rest) instead of sinks + window (0: sinks + window)", min=0.0, max=1.0)
    continuous: bool = param(True, "keep enforcing the budget while decoding (the paper); false: compress the "
                                   "prompt only, as kvpress's StreamingLLMPress does")

    def check(self) -> None:
        if self.sinks + self.window == 0 and self.fraction == 0:
            raise SpecError("streaming: sinks=0 and window=0 keep no token; give a window (e.g. window=1020) or "
                            "sinks, or a fraction of the context (fraction=0.5)")

    def absolute(self) -> int:
        return self.sinks + self.window

    def evict(self, cache: KVCache) -> None:
        for layer in cache.layers:
            held = layer.n_committed
            keep = self.kept(context_length(layer))
            if held <= keep:
                continue
            sinks = min(self.sinks, keep)
            layer.keep(torch.cat([torch.arange(sinks), torch.arange(held - (keep - sinks), held)]))
