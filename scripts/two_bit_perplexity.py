"""2-bit weights on the whole model: round-to-nearest, GPTQ and decoupleQ at the same bytes, then PV-Tuning
from the decoupleQ codes, perplexity on the evaluation text and decoder-linear bytes, in one run.

    .venv/bin/python scripts/two_bit_perplexity.py --tokens 2048 --pvtune steps=8

The `--start` quantizer (decoupleq by default) runs once; its model is scored, then `pvtune` (with the given
parameters) tunes that same model, which is scored again: the chain `START+pvtune:...` applied in two parts,
with the original weights recorded first as `apply_compression` does. Bytes are the decoder linears' real
weight bytes as a share of bf16 (the LM head stays bf16). Writes --json (default docs/results/two_bit.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from compression_perplexity import evaluation_ids, perplexity

from workbench.compression.base import CompressionContext, apply_compression, linear_sites, weight_nbytes
from workbench.models import load_model
from workbench.spec import TechniqueSpec
from workbench.text import evaluation_text, text_hash


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=2048, help="evaluation tokens scored")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--baselines", nargs="*", default=["int4:bits=2", "gptq:bits=2"])
    p.add_argument("--start", default="decoupleq", help="the quantizer PV-Tuning starts from")
    p.add_argument("--pvtune", default="", help="pvtune's parameters, e.g. steps=8,tau=0.002")
    p.add_argument("--json", default="docs/results/two_bit.json")
    args = p.parse_args()

    text = evaluation_text()
    base = load_model(args.model)
    ids = evaluation_ids(base, args.tokens)
    bf16_bytes = sum(s.module.weight.numel() * 2 for s in linear_sites(base.model, head=False))
    pv_spec = "pvtune" + (f":{args.pvtune}" if args.pvtune else "")
    meta = {"command": f"scripts/two_bit_perplexity.py --tokens {args.tokens} --start {args.start} "
                       f"--pvtune '{args.pvtune}'", "model": args.model, "text": text_hash(text),
            "tokens": len(ids), "window": args.window, "loadavg_at_start": os.getloadavg()}
    rows = []

    def score(label: str, loaded, seconds: float, extra: dict | None = None) -> None:
        linear = sum(weight_nbytes(s.module) for s in linear_sites(loaded.model, head=False))
        ppl = perplexity(loaded.model, ids, args.window)
        rows.append({"label": label, "linear_share_of_bf16": linear / bf16_bytes, "perplexity": ppl,
                     "apply_s": round(seconds, 1), **(extra or {})})
        print(f"{label:<40} {100 * linear / bf16_bytes:6.2f}% of bf16 linears  ppl {ppl:12.3f}  ({seconds:.0f} s)",
              flush=True)
        with open(args.json, "w") as f:
            json.dump({**meta, "loadavg_now": os.getloadavg(), "points": rows}, f, indent=1)

    score("bf16", base, 0.0)
    for chain in args.baselines:
        loaded, start = load_model(args.model), time.perf_counter()
        apply_compression(loaded, [TechniqueSpec.parse(t) for t in chain.split("+")])
        score(chain, loaded, time.perf_counter() - start)

    loaded = load_model(args.model)
    ctx = CompressionContext(loaded.tokenizer, loaded.dtype, loaded.device, loaded.config.vocab_size)
    for site in linear_sites(loaded.model, head=True):  # as apply_compression does for a chain ending in pvtune
        ctx.original_weight(site.name, site.module)
    start = time.perf_counter()
    with torch.no_grad():
        TechniqueSpec.parse(args.start).build("compression").apply(loaded.model, ctx)
    score(args.start, loaded, time.perf_counter() - start)
    tuner, start = TechniqueSpec.parse(pv_spec).build("compression"), time.perf_counter()
    tuner.apply(loaded.model, ctx)
    score(f"{args.start}+{pv_spec}", loaded, time.perf_counter() - start, {"record": tuner.record})


if __name__ == "__main__":
    main()
