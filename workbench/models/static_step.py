"""The decoding step with fixed shapes, so that a CUDA graph can replay it without the host's launches.

On a GPU a small model's eager step is bound by the host: some 400 kernel launches per token, each a few
microseconds of Python and driver time (docs/performance.md). A CUDA graph records the launches of one step once
and replays them as one; it needs every tensor the step touches at a fixed address and every shape fixed. So
the step here reads its inputs from static buffers (tokens, positions, the tree mask among the new tokens, the
number of cached tokens as a device scalar) and attends over the dense cache's preallocated buffers
[kv_heads, capacity, dim] whole, the slots not yet held masked out (the new tokens' keys and values are written
into their slots by index, inside the step). The model's own layers run unchanged: the static layers below take
the place of the cache's and answer `attention` themselves (`LayerCache.fixed_shape`).

`StaticSteps` keeps one such step per number of new tokens (the one-token step; a drafter's fixed tree sizes, up
to MAX_SHAPES of them and SMALL_QUERY tokens) and runs it when the run allows, else says why not and the engine
runs the eager forward: a cache policy other than `dense` (compressed, evicting or scoring caches change what
and where a layer holds), a drafter that reads hidden states, a tree size beyond the captured ones, a cache that
must grow; on CUDA also a weight layer that cannot be captured (`CompressedLinear.capturable`: pruning's bitmap,
DARE's and ComPEFT's deltas decode with host syncs). The capture is the only CUDA-specific part: `graphs=on`
on a CPU runs the same static step eagerly (how the tests prove it gives the eager path's tokens),
`graphs=compile` hands the step to `torch.compile(mode="reduce-overhead")` (CUDA graphs through Inductor)
instead of capturing it directly.

Left out: a static cache for compressed forms (their per-step shapes change as tokens are quantized or pruned),
and graphs for the prefill (one forward per run: nothing to amortise).
"""

from __future__ import annotations

from typing import Any

import torch

from workbench.cache.base import CachePolicy, KVCache
from workbench.cache.dense import DenseLayerCache, DensePolicy
from workbench.errors import SpecError
from workbench.kernels.backend_torch import group_rows, grouped_sdpa
from workbench.kernels.dispatch import SMALL_QUERY
from workbench.models.llama import LlamaModel, ModelOutput

MAX_SHAPES = 4  # numbers of new tokens a run keeps a static step for (one graph each)
WARMUP = 2  # eager runs before a capture: kernels compiled, allocator settled


class StaticLayer:
    """One layer's dense buffers as the static step sees them: the new tokens' keys, values and positions written
    at the step's slots, attention over every slot under the step's mask."""

    fixed_shape = True
    observer = None
    attention_operation = None

    def __init__(self, layer: DenseLayerCache, step: StaticStep):
        self.k, self.v, self.pos, self.step = layer.k, layer.v, layer.pos, step

    def writable_buffers(self, positions: torch.Tensor, dtype: torch.dtype) -> None:
        return None  # the fused RoPE + append writes at a host-side slot; here slots are device tensors

    def attend_fixed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
                     ) -> torch.Tensor:
        """q: [T, heads, dim]; k, v: [T, kv_heads, dim] of the new tokens. Returns [T, heads * dim]."""
        step = self.step
        self.k.index_copy_(1, step.slots, k.transpose(0, 1))
        self.v.index_copy_(1, step.slots, v.transpose(0, 1))
        self.pos.index_copy_(1, step.slots, positions.expand(self.pos.shape[0], -1))
        out = grouped_sdpa(q.transpose(0, 1), self.k, self.v, step.visible)  # [heads, T, dim]
        return out.transpose(0, 1).reshape(q.shape[0], -1)


class StaticStep:
    """The model's forward for `n_tokens` new tokens over `cache`'s buffers, every input in a static tensor.

    `run` copies the step's inputs in, runs (or replays) the forward and returns its logits [T, vocab]; the dense
    layers then count the new slots as held (`claim`), so commit and rollback work on them as after an eager
    forward. `how`: "graph" (capture on first run, replay after), "compile" or "eager"."""

    def __init__(self, model: LlamaModel, cache: KVCache, n_tokens: int, how: str):
        first = cache.layers[0]
        device, capacity = first.k.device, first.capacity
        self.model, self.n_tokens, self.how = model, n_tokens, how
        self.buffers = [layer.k for layer in cache.layers]  # the step holds only while these are the cache's
        for layer in cache.layers:  # slots never written hold garbage: a masked NaN still poisons p @ v (0 * NaN)
            layer.k[:, layer.length:].zero_()
            layer.v[:, layer.length:].zero_()
        self.tokens = torch.zeros(n_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(n_tokens, dtype=torch.long, device=device)
        self.new_mask = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=device).tril_()
        self.n_past = torch.zeros((), dtype=torch.long, device=device)
        self.offsets = torch.arange(n_tokens, device=device)
        self.all_slots = torch.arange(capacity, device=device)
        self.group = model.config.num_heads // model.config.num_kv_heads
        self.cache = KVCache([StaticLayer(layer, self) for layer in cache.layers])
        self.logits: torch.Tensor | None = None
        self.slots = self.visible = None
        self.graph: Any = None
        self.runs = 0
        self.compiled = torch.compile(self._forward, mode="reduce-overhead") if how == "compile" else None

    def holds(self, cache: KVCache) -> bool:
        """Whether this step still reads `cache`'s buffers (a grown cache reallocates them)."""
        return all(layer.k is buffer for layer, buffer in zip(cache.layers, self.buffers))

    def _forward(self) -> None:
        """The step itself: only device work on the static tensors (what a graph records)."""
        self.slots = self.n_past + self.offsets
        visible = (self.all_slots < self.n_past).expand(self.n_tokens, -1).clone()
        visible.scatter_(1, self.slots.expand(self.n_tokens, -1), self.new_mask)  # the new tokens under the mask
        self.visible = group_rows(visible, self.group)
        self.logits = self.model(self.tokens, self.positions, self.cache).logits

    def run(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
            ) -> torch.Tensor:
        n_past = cache.layers[0].length
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        if mask is not None:
            self.new_mask.copy_(mask)
        self.n_past.fill_(n_past)
        if self.how == "graph":
            self._replay()
        elif self.how == "compile":
            self.compiled()
        else:
            self._forward()
        self.runs += 1
        for layer in cache.layers:
            layer.claim(self.n_tokens)
        return self.logits.clone()  # a replay overwrites the graph's output

    def _replay(self) -> None:
        if self.graph is None:  # capture once, with this step's real inputs (the warm-up writes the same slots)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(WARMUP):
                    self._forward()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._forward()
        self.graph.replay()
        self.model.whole_forwards += 1  # what the forward counts in Python, which a replay does not run


class StaticSteps:
    """A run's static steps, one per number of new tokens, and the record of when they ran (`report`)."""

    def __init__(self, model: LlamaModel, cache: KVCache, policies: list[CachePolicy], mode: str):
        """mode: RunSpec.graphs (spec.GRAPH_MODES)."""
        cuda = model.device.type == "cuda"
        if mode == "compile" and not cuda:
            raise SpecError("graphs=compile needs a CUDA device (torch.compile's reduce-overhead mode records CUDA "
                            "graphs); use graphs=on to run the static step eagerly here, or graphs=off")
        on = mode in ("on", "compile") or (mode == "auto" and cuda)
        self.mode, self.model, self.cache = mode, model, cache
        self.how = "compile" if mode == "compile" else "graph" if cuda else "eager"
        self.steps: dict[int, StaticStep] = {}
        self.static_steps = self.eager_steps = 0
        self.fallbacks: dict[str, int] = {}  # why a step ran eagerly -> how many times
        self.refused = None if on else "graphs off"
        if on:
            self.refused = _run_refusal(cache, policies) or (_capture_refusal(model) if self.how != "eager" else None)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                needs_hidden: bool) -> ModelOutput | None:
        """The step's output from a static step, or None (counted, with the reason) where the eager forward must
        run. tokens, positions: [T]; mask: [T, T] bool or None (one token)."""
        if self.refused:
            self.eager_steps += 1
            return None
        reason = self._step_refusal(tokens.shape[0], needs_hidden)
        if reason:
            self.eager_steps += 1
            self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
            return None
        n = tokens.shape[0]
        step = self.steps.get(n)
        if step is None or not step.holds(self.cache):
            step = self.steps[n] = StaticStep(self.model, self.cache, n, self.how)
        self.static_steps += 1
        return ModelOutput(step.run(self.cache, tokens, positions, mask))

    def _step_refusal(self, n: int, needs_hidden: bool) -> str | None:
        layers = self.cache.layers
        length = layers[0].length
        if needs_hidden:
            return "the step reads or feeds hidden states"
        if n > SMALL_QUERY or (n not in self.steps and len(self.steps) >= MAX_SHAPES):
            return "a tree size beyond the captured ones"
        if any(layer.length != length for layer in layers) or length + n > layers[0].capacity:
            return "the cache must grow or its layers differ in length"
        return None

    def report(self) -> dict[str, Any]:
        """For the run's provenance: the mode asked, how steps ran, the shapes kept, and why steps ran eagerly."""
        ran = "off" if self.refused else {"graph": "cuda graphs", "compile": "torch.compile reduce-overhead",
                                          "eager": "static buffers, eager"}[self.how]
        return {"graphs": self.mode, "ran": ran, "static_steps": self.static_steps, "eager_steps": self.eager_steps,
                "shapes": sorted(self.steps), "fallbacks": dict(self.fallbacks), "refused": self.refused}


def _capture_refusal(model: LlamaModel) -> str | None:
    """Why this model's step cannot be recorded as a CUDA graph (a weight layer that is not `capturable`), or
    None."""
    for name, module in model.named_modules():
        if not getattr(module, "capturable", True):
            return f"a weight layer that cannot be captured ({name}: {type(module).__name__})"
    return None


def _run_refusal(cache: KVCache, policies: list[CachePolicy]) -> str | None:
    """Why this run's cache cannot take static steps at all, or None."""
    if any(not isinstance(policy, DensePolicy) for policy in policies):
        return "a cache policy other than dense (it changes what the layers hold)"
    if any(type(layer) is not DenseLayerCache or layer.observer is not None for layer in cache.layers):
        return "a layer cache other than plain dense buffers"
    if len({layer.capacity for layer in cache.layers}) != 1:
        return "layers of different capacities"
    return None
