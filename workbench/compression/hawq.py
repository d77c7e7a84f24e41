"""HAWQ: bits per layer from the loss Hessian's trace, estimated by Hutchinson's method, under a bit budget.

Papers: "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks", Dong et al.,
arXiv 1911.03852 (trace sensitivity, Hutchinson's estimator), and "HAWQ-V3: Dyadic Neural Network
Quantization", Yao et al., arXiv 2011.10680 (the bit allocation as an integer program under a size budget).

Each decoder linear's sensitivity at b bits is Ω_i(b) = Tr(H_i) / n_i · ‖Q_b(W_i) − W_i‖², with H_i the
Hessian of the calibration loss (next-token cross-entropy) with respect to the layer's n_i weights and Q_b
round-to-nearest at b bits. Tr(H_i) = E[vᵀ H_i v] over Rademacher v (Hutchinson), each sample one
Hessian-vector product by double backward through the model in float32, on one calibration segment (in
turn). The plan minimises Σ Ω_i(b_i) subject to Σ n_i b_i ≤ budget · Σ n_i, solved exactly by dynamic
programming over the budget in units of the layers' common size (HAWQ-V3 uses an ILP solver for the same
problem). Left out: HAWQ's activation quantization, and latency or BOPs constraints beside the size budget.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workbench.compression.base import LinearSite
from workbench.compression.plan import LEVELS, LevelTable


def hutchinson_traces(model: nn.Module, sites: list[LinearSite], segments: list[torch.Tensor], samples: int,
                      seed: int, deadline: float, progress: bool = True) -> tuple[dict[str, float], int]:
    """Tr(H_i) per site (mean over the samples that fit before `deadline`, at least one), and the sample count."""
    weights = [s.module.weight for s in sites]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    sums = [0.0] * len(sites)
    done, last = 0, 0.0  # samples finished, and the last one's seconds
    try:
        with torch.enable_grad():
            for k in tqdm(range(samples), desc="hawq: Hutchinson samples", disable=not progress):
                # The budget holds within samples: after the first, a sample starts only if one more (as long
                # as the last) fits, and one whose forward ends past the deadline is dropped before its
                # double backward, the costly part.
                if done and time.monotonic() + last > deadline:
                    break
                begin = time.monotonic()
                # One calibration segment per sample, in turn: each sample estimates the trace of the mean
                # loss's Hessian, and a sample costs one segment's forward and double backward.
                seg = segments[k % len(segments)]
                vs = [torch.randint(0, 2, w.shape, generator=g).to(w.dtype) * 2 - 1 for w in weights]
                logits = model(seg, torch.arange(len(seg))).logits.float()
                if done and time.monotonic() > deadline:
                    break
                loss = F.cross_entropy(logits[:-1], seg[1:])
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                hvs = torch.autograd.grad(sum((gr * v).sum() for gr, v in zip(grads, vs)), weights)
                for i, (hv, v) in enumerate(zip(hvs, vs)):
                    sums[i] += float((hv * v).sum())
                done += 1
                last = time.monotonic() - begin
    finally:
        for w in weights:
            w.requires_grad_(False)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return {s.name: total / done for s, total in zip(sites, sums)}, done


def allocate(sensitivity: dict[str, dict[int, float]], sizes: dict[str, int], budget_bits: float) -> dict[str, int]:
    """Bits per site minimising Σ sensitivity[site][bits] with Σ size · bits ≤ budget_bits · Σ size (exact DP)."""
    names = list(sensitivity)
    unit = math.gcd(*(sizes[n] for n in names))
    low = min(LEVELS)
    capacity = math.floor((budget_bits - low) * sum(sizes[n] for n in names) / unit + 1e-9)
    if capacity < 0:
        raise ValueError(f"a budget of {budget_bits} bits is below the lowest level, {low}")
    best = [0.0] + [math.inf] * capacity  # best[c]: least total sensitivity spending c extra units
    choices: list[list[int]] = []
    for name in names:
        cost = sizes[name] // unit
        new, pick = [math.inf] * (capacity + 1), [low] * (capacity + 1)
        for c, value in enumerate(best):
            if value == math.inf:
                continue
            for bits in LEVELS:
                c2 = c + (bits - low) * cost
                if c2 <= capacity and value + sensitivity[name][bits] < new[c2]:
                    new[c2], pick[c2] = value + sensitivity[name][bits], bits
        best = new
        choices.append(pick)
    c = min(range(capacity + 1), key=lambda k: best[k])
    levels = {}
    for name, pick in zip(reversed(names), reversed(choices)):
        levels[name] = pick[c]
        c -= (pick[c] - low) * (sizes[name] // unit)
    return {n: levels[n] for n in names}


def hawq_plan(model: nn.Module, table: LevelTable, originals: dict[str, torch.Tensor],
              segments: list[torch.Tensor], budget_bits: float, samples: int, seed: int, deadline: float,
              progress: bool = True) -> tuple[dict[str, int], dict]:
    """The HAWQ plan for `budget_bits` and what it was built from (traces, samples drawn)."""
    traces, drawn = hutchinson_traces(model, table.sites, segments, samples, seed, deadline, progress)
    sensitivity = {n: {b: traces[n] / table.sizes[n] * table.error(n, b, originals[n]) for b in LEVELS}
                   for n in traces}
    return allocate(sensitivity, table.sizes, budget_bits), {"hutchinson_samples": drawn, "traces": traces}
