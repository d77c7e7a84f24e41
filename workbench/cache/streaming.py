"""StreamingLLM: attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.base import KVCache
from workbench.cache.scores import BudgetEviction, context_length, kept_count
from workbench.registry import param, register


@register("cache", "streaming", lossless=False)
@dataclass
class StreamingPolicy(BudgetEviction):
    """StreamingLLM: the first few tokens (attention sinks) plus a window of the most recent ones.

    "Efficient Streaming Language Models with Attention Sinks" (arXiv 2309.17453). Softmax attention dumps
    much of its mass on the first tokens whatever they say; evicting them breaks the model, so the cache keeps
    `sinks` initial tokens and a rolling window of recent ones, and drops the middle. Enforced continuously,
    as in the paper (`continuous=false`: the prefill only): after the prefill and after every step, each
    layer holds kept_count(tokens seen, budget) = `sinks` + the most recent rest (the same tokens in every
    head). Left out: the paper assigns RoPE positions by place in the cache (positions stay the text's here,
    RoPE being applied before caching, as kvpress does), and its fixed cache size (here a fraction of the
    context, the workbench's budget convention).
    """

    budget: float = param(0.5, "fraction of the context's tokens kept: sinks + recent window", min=0.0, max=1.0)
    sinks: int = param(4, "attention-sink tokens kept at the start of the context", min=0, max=1024)
    continuous: bool = param(True, "keep enforcing the budget while decoding (the paper); false: compress the "
                                   "prompt only, as kvpress's StreamingLLMPress does")

    def evict(self, cache: KVCache) -> None:
        for layer in cache.layers:
            held = layer.n_committed
            keep = kept_count(context_length(layer), self.budget)
            if held <= keep:
                continue
            sinks = min(self.sinks, keep)
            layer.keep(torch.cat([torch.arange(sinks), torch.arange(held - (keep - sinks), held)]))
