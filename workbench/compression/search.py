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
from workbench.spec import DEFAULT_MODEL

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


def add_search_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search a per-layer bit plan under a bit budget (HAWQ or EvoPress)",
                       description="Searches bits per decoder linear (round-to-nearest 2, 3 or 4) with an average "
                       "of at most --budget-bits and writes the plan, a RunSpec string, to -o; run it with "
                       "--compress plan:FILE (docs/compression.md).")
    p.add_argument("--budget-bits", type=float, required=True, help="average bits per weight of the decoder linears")
    p.add_argument("--method", choices=METHODS, default="evopress")
    p.add_argument("--minutes", type=float, default=3.0, help="time budget (the search stops after it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group", type=int, default=64, help="inputs per scale/offset group")
    p.add_argument("--tokens", type=int, default=1024, help="calibration tokens (standard-library docstrings)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="auto")
    p.add_argument("-o", "--output", required=True, help="file the plan is written to")
    p.add_argument("--json", help="also write the plan, its levels and the search's record to this JSON file")
    p.set_defaults(func=cmd_search)


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
