"""HAWQ: bits per layer from the trace of the loss's curvature, estimated by Hutchinson's method, under a budget.

Papers: "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks", Dong et al.,
arXiv 1911.03852 (trace sensitivity, Hutchinson's estimator), and "HAWQ-V3: Dyadic Neural Network
Quantization", Yao et al., arXiv 2011.10680 (the bit allocation as an integer program under a size budget).

Each decoder linear's sensitivity at level l (bits and group, compression/plan.py) is
Ω_i(l) = Tr(C_i) / n_i · ‖Q_l(W_i) − W_i‖², with C_i the curvature of the calibration loss (next-token
cross-entropy) with respect to the layer's n_i weights and Q_l the level's quantizer (round-to-nearest or
GPTQ). Both curvatures are traced by Hutchinson's method (a random probe r with E[r rᵀ] = I, so
E[rᵀ C r] = Tr C), one sample per calibration segment in turn, in float32:
- `fisher` (default): C is the Gauss-Newton matrix Jᵀ H_out J, which equals the Fisher matrix for a softmax
  output. The probe lives in the output space: r = onehot(y) − p with y drawn from the model at every
  position has covariance H_out, so ‖J_iᵀ r‖², one backward, estimates Tr(G_i). Never negative.
- `hessian`: C is the loss Hessian, HAWQ's own choice, probed by Rademacher v (vᵀ H_i v by double backward).
  The model is not at a minimum of the calibration loss, so H_i is indefinite. A few samples leave some
  estimates below zero. Those are raised to the smallest positive one, since a negative Ω would reward error.
The Gauss-Newton matrix is the Hessian less the term of the loss's slope, which HAWQ's converged-model
argument drops anyway; on the embedded model its plans beat uniform 3-bit where the Hessian's do not
(docs/compression.md). The plan minimises Σ Ω_i(l_i) subject to the bits stored (codes, scales, offsets)
staying within the budget, solved exactly by dynamic programming over the budget in units of the layers'
common size times the levels' half-bit step (HAWQ-V3 uses an ILP solver for the same problem). Left out:
HAWQ's activation quantization, and latency or BOPs constraints beside the size budget.
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


def _hessian_probe(logits: torch.Tensor, seg: torch.Tensor, weights: list[torch.Tensor], g: torch.Generator
                   ) -> list[float]:
    """vᵢᵀ (H v)ᵢ per weight for one Rademacher v: Hutchinson on the loss Hessian, by double backward."""
    vs = [torch.randint(0, 2, w.shape, generator=g).to(w.dtype) * 2 - 1 for w in weights]
    loss = F.cross_entropy(logits[:-1], seg[1:])
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    hvs = torch.autograd.grad(sum((gr * v).sum() for gr, v in zip(grads, vs)), weights)
    return [float((hv * v).sum()) for hv, v in zip(hvs, vs)]


def _fisher_probe(logits: torch.Tensor, seg: torch.Tensor, weights: list[torch.Tensor], g: torch.Generator
                  ) -> list[float]:
    """‖Jᵢᵀ r‖² / n per weight, r = onehot(y) − p with every position's y drawn from the model: the probe's
    covariance is the softmax's Hessian, so this is Hutchinson on the Gauss-Newton matrix of the mean loss."""
    logits = logits[:-1]
    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=g)[:, 0]
    grads = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), weights)
    return [float(gr.pow(2).sum()) / len(y) for gr in grads]


CURVATURES = {"fisher": _fisher_probe, "hessian": _hessian_probe}  # name -> one sample's per-weight estimates


def trace_estimates(model: nn.Module, sites: list[LinearSite], segments: list[torch.Tensor], samples: int,
                    seed: int, deadline: float, curvature: str = "fisher", progress: bool = True
                    ) -> tuple[dict[str, float], int]:
    """Tr(H_i) (or of the Gauss-Newton matrix G_i, `curvature="fisher"`) per site: the mean over the samples
    that fit before `deadline` (at least one), and the sample count."""
    probe = CURVATURES[curvature]
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
            for k in tqdm(range(samples), desc=f"hawq: {curvature} trace samples", disable=not progress):
                # The budget holds within samples: after the first, a sample starts only if one more (as long
                # as the last) fits, and one whose forward ends past the deadline is dropped before its
                # backward, the costly part.
                if done and time.monotonic() + last > deadline:
                    break
                begin = time.monotonic()
                # One calibration segment per sample, in turn: each sample estimates the trace of the mean
                # loss's curvature, and a sample costs one segment's forward and (double) backward.
                seg = segments[k % len(segments)]
                logits = model(seg, torch.arange(len(seg))).logits.float()
                if done and time.monotonic() > deadline:
                    break
                for i, value in enumerate(probe(logits, seg, weights, g)):
                    sums[i] += value
                done += 1
                last = time.monotonic() - begin
    finally:
        for w in weights:
            w.requires_grad_(False)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return {s.name: total / done for s, total in zip(sites, sums)}, done


def allocate(sensitivity: dict[str, dict[int, float]], sizes: dict[str, int], budget: float) -> dict[str, int]:
    """A level per site minimising Σ sensitivity[site][level] with Σ size · level ≤ budget · Σ size (exact DP).
    Levels are integers whose cost grows linearly with them (indices into LEVELS, or bit widths)."""
    names = list(sensitivity)
    unit = math.gcd(*(sizes[n] for n in names))
    levels = sorted(sensitivity[names[0]])
    low = levels[0]
    capacity = math.floor((budget - low) * sum(sizes[n] for n in names) / unit + 1e-9)
    if capacity < 0:
        raise ValueError(f"a budget of {budget} is below the lowest level, {low}")
    best = [0.0] + [math.inf] * capacity  # best[c]: least total sensitivity spending c extra units
    choices: list[list[int]] = []
    for name in names:
        cost = sizes[name] // unit
        new, pick = [math.inf] * (capacity + 1), [low] * (capacity + 1)
        for c, value in enumerate(best):
            if value == math.inf:
                continue
            for bits in levels:
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
              segments: list[torch.Tensor], budget: float, samples: int, seed: int, deadline: float,
              curvature: str = "fisher", progress: bool = True) -> tuple[dict[str, int], dict]:
    """The HAWQ plan for `budget` (a position on the level scale, plan.level_index) and what it was built
    from (traces, samples drawn, how many estimates were below zero)."""
    errors = {n: {k: table.error(n, k, originals[n]) for k in range(len(LEVELS))} for n in table.sizes}
    table.weights.clear()  # only the errors are needed: the levels' weights would stay in memory through the
    originals.clear()      # double backward (the float32 model's six levels and originals are 3 GB on SmolLM2)
    traces, drawn = trace_estimates(model, table.sites, segments, samples, seed, deadline, curvature, progress)
    positive = [t for t in traces.values() if t > 0]
    floor = min(positive) if positive else 1.0
    used = {n: t if t > 0 else floor for n, t in traces.items()}
    sensitivity = {n: {k: used[n] / table.sizes[n] * errors[n][k] for k in range(len(LEVELS))} for n in traces}
    record = {"curvature": curvature, "trace_samples": drawn, "traces": traces,
              "negative_traces": len(traces) - len(positive)}
    return allocate(sensitivity, table.sizes, budget), record
