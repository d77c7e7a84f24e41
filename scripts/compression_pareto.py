"""Bytes against perplexity for weight transforms and searched per-layer plans, in one run.

    .venv/bin/python scripts/compression_pareto.py --tokens 2048 --minutes 2
    .venv/bin/python scripts/compression_pareto.py --quantizer gptq --methods hawq hawq-hessian evopress --chains \
        gptq:bits=3 --minutes 4 --out docs/results/gptq_levels --figure docs/results/gptq_levels/pareto.png

Runs `workbench search` (HAWQ over the Fisher trace, `hawq-hessian` over the Hessian's, EvoPress and FLIQS,
in-process) at --budget-bits, then scores every chain below and the plans with whole-window forwards on the
evaluation text (`compression_perplexity.perplexity`). Bytes are the decoder linears' real weight bytes
(`weight_nbytes`, LM head excluded: it stays bf16 everywhere here) as a share of their bf16 bytes. Writes
docs/results/pareto.json (every point), docs/results/compression_search.json (the plans against uniform
round-to-nearest at the budget) and docs/images/compression_pareto.png. `--quantizer gptq` builds the
searches' levels with GPTQ and compares the plans with uniform GPTQ at the budget (put `gptq:bits=B` first in
--chains).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from compression_perplexity import evaluation_ids, perplexity

from workbench.compression.base import apply_compression, linear_sites, weight_nbytes
from workbench.compression.plan import QUANTIZERS
from workbench.compression.search import search
from workbench.models import load_model
from workbench.spec import RunSpec, TechniqueSpec
from workbench.text import evaluation_text, text_hash

CHAINS = ["int4:bits=3", "int4:bits=2", "prunenet:ratio=0.25", "prunenet:ratio=0.25+int4", "decoupleq",
          "gptq:bits=2", "int4", "int8:head=false", "mx", "dfloat11:head=false", "gptq", "fp4", "prune:sparsity=0.5"]
METHODS = ("hawq", "hawq-hessian", "evopress", "fliqs")  # hawq: over the Fisher trace; hawq-hessian: the Hessian's


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=2048, help="evaluation tokens scored")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--budget-bits", type=float, default=3.0)
    p.add_argument("--minutes", type=float, default=2.0, help="time budget of each search")
    p.add_argument("--chains", nargs="*", default=CHAINS,
                   help="chains scored beside the plans; the first two are the uniform comparison")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--quantizer", default="rtn", choices=list(QUANTIZERS), help="the searches' levels")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--figure", default="docs/images/compression_pareto.png")
    p.add_argument("--replot", action="store_true", help="only redraw the figure from the results' pareto.json")
    args = p.parse_args()
    if args.quantizer != "rtn" and "fliqs" in args.methods:
        p.error("fliqs searches its own formats; with --quantizer gptq give --methods hawq hawq-hessian evopress")
    if args.replot:
        with open(os.path.join(args.out, "pareto.json")) as f:
            saved = json.load(f)
        draw(saved["points"], args.figure, saved)
        return

    load = os.getloadavg()
    plans = {}
    for method in args.methods:
        name, _, curvature = method.partition("-")
        result = search(args.model, name, args.budget_bits, args.minutes, quantizer=args.quantizer,
                        curvature=curvature or "fisher")
        plans[method] = result
        print(f"{method}: {result.average_bits:.3f} bits, {result.seconds:.0f} s: {result.plan}", flush=True)

    text = evaluation_text()
    base = load_model(args.model)
    ids = evaluation_ids(base, args.tokens)
    bf16_bytes = sum(s.module.weight.numel() * 2 for s in linear_sites(base.model, head=False))
    rows = []
    searched = [(f"{m} plan", "+".join(t.to_string() for t in RunSpec.parse(r.plan).compress), m)
                for m, r in plans.items()]
    chains = [(c, c, None) for c in args.chains]
    entries = [("bf16", "", None), *chains[:2], *searched, *chains[2:]]  # the search's comparison first
    command = (f"scripts/compression_pareto.py --tokens {args.tokens} --minutes {args.minutes} "
               f"--budget-bits {args.budget_bits} --quantizer {args.quantizer} --methods {' '.join(args.methods)} "
               f"--chains {' '.join(args.chains)}")
    meta = {"command": command, "model": args.model, "text": text_hash(text), "tokens": len(ids),
            "window": args.window, "loadavg_at_start": load}
    os.makedirs(args.out, exist_ok=True)
    for label, chain, method in entries:
        loaded = load_model(args.model) if chain else base
        start = time.perf_counter()
        if chain:
            apply_compression(loaded, [TechniqueSpec.parse(t) for t in chain.split("+")])
        seconds = time.perf_counter() - start
        linear = sum(weight_nbytes(s.module) for s in linear_sites(loaded.model, head=False))
        ppl = perplexity(loaded.model, ids, args.window)
        rows.append({"label": label, "chain": chain, "search": method, "linear_bytes": linear,
                     "linear_share_of_bf16": linear / bf16_bytes, "model_weight_bytes": loaded.weight_bytes(),
                     "perplexity": ppl, "apply_s": round(seconds, 1)})
        print(f"{label:<28} {100 * linear / bf16_bytes:6.1f}% of bf16 linears  ppl {ppl:12.3f}  "
              f"({seconds:.0f} s)", flush=True)
        with open(os.path.join(args.out, "pareto.json"), "w") as f:  # after every point: a long run keeps its part
            json.dump({**meta, "loadavg_now": os.getloadavg(), "complete": len(rows) == len(entries),
                       "points": rows}, f, indent=1)
        if len(rows) == 1 + len(chains[:2]) + len(plans):  # the uniform baselines and the plans: the search results
            write_search(args, meta, rows, plans)
    draw(rows, args.figure, meta)


def write_search(args: argparse.Namespace, meta: dict, rows: list[dict], plans: dict) -> None:
    ppl = {r["label"]: r["perplexity"] for r in rows}
    quantizer = QUANTIZERS[args.quantizer]  # the transform a plan's levels run
    uniform = {2: f"{quantizer}:bits=2", 3: f"{quantizer}:bits=3", 4: quantizer}.get(int(args.budget_bits))
    with open(os.path.join(args.out, "compression_search.json"), "w") as f:
        json.dump({**meta, "budget_bits": args.budget_bits, "minutes": args.minutes, "quantizer": args.quantizer,
                   "uniform": {"chain": uniform, "perplexity": ppl.get(uniform)},
                   "plans": {m: {"plan": r.plan, "average_bits": r.average_bits, "seconds": round(r.seconds),
                                 "perplexity": ppl[f"{m} plan"],
                                 "record": {k: v for k, v in r.details.items() if k != "traces"}}
                             for m, r in plans.items()}}, f, indent=1)


def draw(rows: list[dict], path: str, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        searched = r["search"] is not None
        ax.scatter(100 * r["linear_share_of_bf16"], r["perplexity"], marker="*" if searched else "o",
                   s=140 if searched else 40, color="#dc2626" if searched else "#2563eb")
        ax.annotate(r["label"], (100 * r["linear_share_of_bf16"], r["perplexity"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("decoder linear weight bytes, % of bf16")
    ax.set_ylabel("perplexity (evaluation text)")
    ax.set_title(f"{meta['model']}: bytes against perplexity ({meta['tokens']} tokens; stars: searched plans; "
                 f"load {meta['loadavg_at_start'][0]:.1f})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
