"""Input second moments H = XᵀX / n of linear layers over calibration text, for GPTQ, EoRA and LLM-FP4.

X [n, in] are the inputs a linear layer sees while the model reads the calibration tokens (split into
segments of `SEGMENT` tokens, each run from position 0 like a separate document). Two ways to collect them:

- `layerwise(...)`: GPTQ's sequential pass (arXiv 2210.17323, section 4 "Step 3" and its reference code):
  the inputs to decoder layer i are computed once, H is collected for layer i's linears, the caller
  transforms them, and layer i is run again, transformed, to give layer i + 1 its inputs. Later layers thus
  see the already-compressed earlier layers and compensate their error. All linears of one layer share a
  pass (the reference code's default, not its `true-sequential` order within a layer). The LM head, when
  chosen, is last and sees the final norm of the transformed stack.
- `second_moments(...)`: one pass of the whole model as it is, hooks on every chosen linear; `diagonal`
  keeps only mean(x_j²) per input channel (what LLM-FP4's weighted error needs) at a fraction of the memory.

Sums are float32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from workbench.compression.base import LinearSite

SEGMENT = 512  # tokens per calibration segment


def segments(ids: torch.Tensor, length: int = SEGMENT) -> list[torch.Tensor]:
    """Split calibration token ids [n] into segments of `length` (the last may be shorter)."""
    return [s for s in ids.split(length) if len(s) > 0]


class _Moments:
    """Running sum of xᵀx (or of x², diagonal) over the rows of every input a module sees."""

    def __init__(self, in_features: int, device: torch.device, diagonal: bool):
        shape = (in_features,) if diagonal else (in_features, in_features)
        self.sum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.rows = 0
        self.diagonal = diagonal

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += (x * x).sum(0) if self.diagonal else x.T @ x
        self.rows += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.rows, 1)


@contextmanager
def _hooks(modules: dict[str, nn.Module], diagonal: bool) -> Iterator[dict[str, _Moments]]:
    moments = {}
    handles = []
    for name, module in modules.items():
        device = next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))
        moments[name] = m = _Moments(module.in_features, device, diagonal)
        handles.append(module.register_forward_pre_hook(lambda _mod, args, m=m: m.add(args[0])))
    try:
        yield moments
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def second_moments(model: nn.Module, sites: list[LinearSite], ids: torch.Tensor,
                   diagonal: bool = False) -> dict[str, torch.Tensor]:
    """H [in, in] (or its diagonal [in]) per site name, from one pass of the model as it is now."""
    with _hooks({s.name: s.module for s in sites}, diagonal) as moments:
        for seg in segments(ids.to(model.device)):
            model(seg, torch.arange(len(seg), device=seg.device), last_only=True)
    return {name: m.mean() for name, m in moments.items()}


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the inputs it needed were caught."""


def _stop(*_) -> None:
    raise _Stop


def _layer_inputs(model: nn.Module, seg: torch.Tensor) -> tuple[tuple, dict]:
    """The arguments the model passes to its first decoder layer for this segment (embeddings, RoPE...)."""
    caught = {}

    def catch(_module, args, kwargs):
        caught["args"], caught["kwargs"] = args, kwargs
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model(seg, torch.arange(len(seg), device=seg.device))
    except _Stop:
        pass
    finally:
        handle.remove()
    return caught["args"], caught["kwargs"]


@torch.no_grad()
def layerwise(model: nn.Module, sites: list[LinearSite], ids: torch.Tensor,
              transform: Callable[[list[LinearSite], dict[str, torch.Tensor]], None]) -> None:
    """GPTQ's sequential pass (see the module docstring): for each decoder layer holding chosen sites, then
    the LM head, collect H for those sites and call `transform(layer_sites, hessians)`, which replaces them."""
    calls = [_layer_inputs(model, seg) for seg in segments(ids.to(model.device))]
    states = [args[0] for args, _ in calls]  # residual stream entering the current layer, per segment
    for layer in model.layers:
        inside = {id(m) for m in layer.modules()}
        chosen = [s for s in sites if id(s.module) in inside]
        if chosen:
            with _hooks({s.name: s.module for s in chosen}, diagonal=False) as moments:
                for x, (args, kwargs) in zip(states, calls):
                    layer(x, *args[1:], **kwargs)
            transform(chosen, {name: m.mean() for name, m in moments.items()})
        states = [layer(x, *args[1:], **kwargs) for x, (args, kwargs) in zip(states, calls)]
    head = [s for s in sites if s.module is model.lm_head]
    if head:
        with _hooks({head[0].name: head[0].module}, diagonal=False) as moments:
            stop = head[0].module.register_forward_pre_hook(_stop)  # the head's input is all we need
            try:
                for x in states:
                    try:
                        model.logits(x)
                    except _Stop:
                        pass
            finally:
                stop.remove()
        transform(head, {name: m.mean() for name, m in moments.items()})
