"""`workbench search`: a per-layer plan of levels (bits and group, compression/plan.py) no larger than uniform
`--budget-bits` at `--group` (bytes of codes, scales and offsets), by HAWQ or EvoPress (or FLIQS over integer
and float formats, compression/fliqs.py), written as a RunSpec string (`compress=int4:bits=2,group=32,
layers=...+...`, or `gptq:...` with `--quantizer gptq`) that `--compress plan:FILE` runs.

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
from workbench.compression.hawq import CURVATURES, allocate, hawq_plan
from workbench.compression.int4 import KERNEL_GROUPS
from workbench.compression.plan import (
    LEVELS,
    QUANTIZERS,
    SCALE_BITS,
    LevelTable,
    average_bits,
    level_index,
    plan_string,
)
from workbench.errors import SpecError

METHODS = ("evopress", "hawq", "fliqs")


@dataclass
class SearchResult:
    method: str
    plan: str  # the RunSpec string
    levels: dict[str, int]
    average_bits: float
    seconds: float
    details: dict = field(default_factory=dict)


def on_budget(table: LevelTable, budget: float) -> dict[str, int]:
    """The plan closest to uniform that uses as much of the budget (a level index) as fits (uniform when the
    budget is a level)."""
    closeness = {n: {k: abs(k - budget) * table.sizes[n] for k in range(len(LEVELS))} for n in table.sizes}
    return allocate(closeness, table.sizes, budget)


def search(model_name: str, method: str, budget_bits: float, minutes: float, seed: int = 0, group: int = 64,
           tokens: int = 1024, device: str = "auto", progress: bool = True, samples: int = 64,
           offspring: int = 16, survivors: tuple[int, ...] = (4, 2), generations: int = 10_000,
           quantizer: str = "rtn", curvature: str = "fisher") -> SearchResult:
    """Run one search (HAWQ: `samples` trace estimates of `curvature`, fisher or hessian; EvoPress: `offspring`
    per generation and `survivors` per selection step) within `minutes`, on `tokens` calibration tokens (never
    the evaluation text), for a plan whose stored bits per weight are at most uniform `budget_bits` at `group`'s.
    The levels' database (GPTQ's included) is built before the clock starts; `seconds` counts it."""
    from workbench.models import load_model

    if method not in METHODS:
        raise SpecError(f"search: unknown method {method!r}; valid: {', '.join(METHODS)}")
    if curvature not in CURVATURES:
        raise SpecError(f"search: unknown curvature {curvature!r}; valid: {', '.join(CURVATURES)}")
    if quantizer not in QUANTIZERS:
        raise SpecError(f"search: unknown quantizer {quantizer!r}; valid: {', '.join(QUANTIZERS)}")
    if group not in KERNEL_GROUPS:
        raise SpecError(f"search: --group {group} is not one of {', '.join(map(str, KERNEL_GROUPS))}")
    if method == "fliqs":  # integer and float formats of its own menu, under the same bytes (compression/fliqs.py)
        if quantizer != "rtn":
            raise SpecError("search: --quantizer applies to hawq and evopress; fliqs searches its own formats")
        from workbench.compression.fliqs import fliqs_search

        return fliqs_search(model_name, budget_bits + SCALE_BITS / group, minutes, seed, tokens, device, progress)
    budget = level_index(budget_bits, group)
    if not 0 <= budget <= len(LEVELS) - 1:
        raise SpecError(f"search: --budget-bits {budget_bits} at group {group} is outside the levels' range "
                        f"(bits 2-4 at group 64 or 32: {LEVELS[0].cost}-{LEVELS[-1].cost} bits stored per weight)")
    start = time.monotonic()
    torch.manual_seed(seed)
    # HAWQ's Hessian-vector products need float32; EvoPress scores in the model's own dtype.
    loaded = load_model(model_name, "float32" if method == "hawq" else "auto", device)
    model = loaded.model
    ctx = CompressionContext(loaded.tokenizer, loaded.dtype, loaded.device, loaded.config.vocab_size)
    ids = ctx.calibration_ids(tokens)
    segs = split_segments(ids, 256)
    table = LevelTable.build(model, quantizer, ids, progress)
    deadline = time.monotonic() + 60 * minutes
    if method == "hawq":
        originals = {s.name: dense_weight(s.module).clone() for s in table.sites}
        levels, details = hawq_plan(model, table, originals, segs, budget, samples, seed, deadline, curvature,
                                    progress)
    else:
        levels, details = evopress_plan(model, table, segs, on_budget(table, budget), offspring, survivors,
                                        generations, seed, deadline, progress)
    details["budget_bits_stored"] = LEVELS[0].cost + budget * (LEVELS[1].cost - LEVELS[0].cost)
    return SearchResult(method, plan_string(levels, table.attrs, quantizer), levels,
                        average_bits(levels, table.sizes), time.monotonic() - start, details)


def cmd_search(args: argparse.Namespace) -> int:
    result = search(args.model, args.method, args.budget_bits, args.minutes, args.seed, args.group, args.tokens,
                    args.device, quantizer=args.quantizer, curvature=args.curvature)
    with open(args.output, "w") as f:
        f.write(result.plan + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.__dict__, f, indent=1)
    print(f"{result.method}: {result.average_bits:.3f} bits stored per weight (budget "
          f"{result.details['budget_bits_stored']:.3f}) in {result.seconds:.0f} s -> {args.output}")
    print(result.plan)
    return 0
