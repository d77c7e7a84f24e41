"""EvoPress: evolutionary search over per-layer compression levels under a total budget.

Paper: "EvoPress: Towards Optimal Dynamic Model Compression via Evolutionary Search", Sieberling et al.,
arXiv 2410.14649.

The search is a (1 + λ) evolution over plans (a level per decoder linear from a database of compressed
weights: bits 2, 3, 4 at groups 64 and 32, round-to-nearest or GPTQ, in equal steps of half a bit stored per
weight, compression/plan.py), starting from the uniform plan at the budget. Each generation makes λ offspring
of the parent by the paper's level-switch mutation: one linear goes up a level and another of the same shape
goes down one, so the total size stays exactly on budget. Offspring are chosen by multi-step selection: all
are scored on a few calibration tokens, the best `survivors` of each step go on to a step with more tokens,
and the last step's best (with the parent scored alongside, so the parent is kept if no child beats it)
becomes the next parent. The fitness is the KL divergence of the plan's next-token distributions from the
uncompressed model's on the calibration text (lower is better). The time budget is checked before every plan
is scored: when it runs out mid-generation, that generation is dropped and the current parent is the result.
Left out: the paper's finer level databases (here six levels), its layer-dropping and unstructured-sparsity
variants.
"""

from __future__ import annotations

import random
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.compression.plan import LEVELS, LevelTable, calibration_kl, reference_logprobs


class OutOfTime(Exception):
    """The search's deadline passed during a generation."""


def level_switch(levels: dict[str, int], shapes: dict[str, tuple[int, int]], rng: random.Random) -> dict[str, int]:
    """The paper's mutation: one site up a level and one of the same shape down one (size unchanged)."""
    child = dict(levels)
    top = len(LEVELS) - 1
    while True:
        up = rng.choice([n for n, k in levels.items() if k < top])
        downs = [n for n, k in levels.items() if k > 0 and n != up and shapes[n] == shapes[up]]
        if downs:
            down = rng.choice(downs)
            child[up] += 1
            child[down] -= 1
            return child


def evopress_plan(model: nn.Module, table: LevelTable, segments: list[torch.Tensor], start: dict[str, int],
                  offspring: int, survivors: tuple[int, ...], generations: int, seed: int, deadline: float,
                  progress: bool = True) -> tuple[dict[str, int], dict]:
    """Search from `start` (a plan at the budget). `segments` are calibration segments; selection step k
    scores on the first 2^k segments' worth of a doubling schedule ending at all of them, keeping
    `survivors[k]` plans. Returns the best plan and a history of its fitness per generation."""
    rng = random.Random(seed)
    shapes = {s.name: tuple(s.module.weight.shape) for s in table.sites}
    if not any(k < len(LEVELS) - 1 for k in start.values()) or not any(k > 0 for k in start.values()):
        return start, {"generations": 0, "fitness": []}  # all at one end: no level switch keeps the budget
    dense = {s.name: s.module.weight.data for s in table.sites}
    steps = len(survivors) + 1
    sizes = [max(1, len(segments) >> (steps - 1 - k)) for k in range(steps)]  # segments scored per step
    reference = reference_logprobs(model, segments)

    def fitness(levels: dict[str, int], n: int) -> float:
        if time.monotonic() > deadline:  # checked before every scoring, so the budget holds within a generation
            raise OutOfTime
        table.install(levels)
        return calibration_kl(model, segments[:n], reference[:n])

    parent, history = start, []
    try:
        bar = tqdm(range(generations), desc="evopress: generations", disable=not progress)
        for _ in bar:
            pool = [level_switch(parent, shapes, rng) for _ in range(offspring)]
            for keep, n in zip(survivors, sizes):
                pool = sorted(pool, key=lambda p, n=n: fitness(p, n))[:keep]
            final = [parent, *pool]
            scores = [fitness(p, sizes[-1]) for p in final]
            best = min(range(len(final)), key=scores.__getitem__)
            parent = final[best]
            history.append(scores[best])
            bar.set_postfix(kl=f"{scores[best]:.4f}")
    except OutOfTime:  # the generation under way is dropped; the parent is the best plan scored so far
        pass
    finally:
        for site in table.sites:  # leave the model as it came
            site.module.weight.data = dense[site.name]
    return parent, {"generations": len(history), "fitness": history}
