"""`workbench search`: a per-layer bit plan under an average bit budget, by HAWQ or EvoPress, written as a
RunSpec string (`compress=int4:bits=2,layers=...+...`) that `--compress plan:FILE` runs.

    workbench search --budget-bits 3.0 --method evopress --minutes 3 -o plan.txt
    workbench generate --compress plan:plan.txt "def fib(n):"
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

import torch

from workbench.compression.base import CompressionContext, dense_weight
from workbench.compression.calibration import segments as split_segments
from workbench.compression.evopress import evopress_plan
from workbench.compression.hawq import allocate, hawq_plan
from workbench.compression.int4 import KERNEL_GROUPS
from workbench.compression.plan import LEVELS, LevelTable, average_bits, plan_string
from workbench.errors import SpecError

METHODS = ("evopress", "hawq")


@dataclass
class SearchResult:
    method: str
    plan: str  # the RunSpec string
    levels: dict[str, int]
    average_bits: float
    seconds: float
    details: dict = field(default_factory=dict)


def on_budget(table: LevelTable, budget_bits: float) -> dict[str, int]:
    """The plan closest to uniform that uses as much of the budget as fits (uniform when the budget is a level)."""
    closeness = {n: {b: abs(b - budget_bits) * table.sizes[n] for b in LEVELS} for n in table.sizes}
    return allocate(closeness, table.sizes, budget_bits)


def search(model_name: str, method: str, budget_bits: float, minutes: float, seed: int = 0, group: int = 64,
           tokens: int = 1024, device: str = "auto", progress: bool = True, samples: int = 64,
           offspring: int = 16, survivors: tuple[int, ...] = (4, 2), generations: int = 10_000) -> SearchResult:
    """Run one search (HAWQ: Hutchinson `samples`; EvoPress: `offspring` per generation and `survivors` per
    selection step) within `minutes`, on `tokens` calibration tokens (never the evaluation text)."""
    from workbench.models import load_model

    if method not in METHODS:
        raise SpecError(f"search: unknown method {method!r}; valid: {', '.join(METHODS)}")
    if not min(LEVELS) <= budget_bits <= max(LEVELS):
        raise SpecError(f"search: --budget-bits {budget_bits} is outside the levels' range "
                        f"{min(LEVELS)}-{max(LEVELS)} bits per weight")
    if group not in KERNEL_GROUPS:
        raise SpecError(f"search: --group {group} is not one of {', '.join(map(str, KERNEL_GROUPS))}")
    start = time.monotonic()
    deadline = start + 60 * minutes
    torch.manual_seed(seed)
    # HAWQ's Hessian-vector products need float32; EvoPress scores in the model's own dtype.
    loaded = load_model(model_name, "float32" if method == "hawq" else "auto", device)
    model = loaded.model
    ctx = CompressionContext(loaded.tokenizer, loaded.dtype, loaded.device, loaded.config.vocab_size)
    segs = split_segments(ctx.calibration_ids(tokens), 256)
    table = LevelTable.build(model, group)
    if method == "hawq":
        originals = {s.name: dense_weight(s.module).clone() for s in table.sites}
        levels, details = hawq_plan(model, table, originals, segs, budget_bits, samples, seed, deadline, progress)
    else:
        levels, details = evopress_plan(model, table, segs, on_budget(table, budget_bits), offspring, survivors,
                                        generations, seed, deadline, progress)
    return SearchResult(method, plan_string(levels, table.attrs, group), levels,
                        average_bits(levels, table.sizes), time.monotonic() - start, details)


def cmd_search(args: argparse.Namespace) -> int:
    result = search(args.model, args.method, args.budget_bits, args.minutes, args.seed, args.group, args.tokens,
                    args.device)
    with open(args.output, "w") as f:
        f.write(result.plan + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.__dict__, f, indent=1)
    print(f"{result.method}: average {result.average_bits:.3f} bits in {result.seconds:.0f} s -> {args.output}")
    print(result.plan)
    return 0
