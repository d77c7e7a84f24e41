"""Perplexity of weight-transform chains on the evaluation text, with whole-window forwards (no cache).

    .venv/bin/python scripts/compression_perplexity.py int4:group=64 gptq:group=64 int4:group=64+eora:rank=32

The uncompressed model is always the first row. Each chain is applied to a fresh copy of the model; the text
(`workbench.text.evaluation_text()`, hash printed) is cut into windows of `--window` tokens, each run from
position 0, and every token after a window's first is scored. Faster than `workbench eval` (one forward per
window instead of one decoding step per scored token) and so able to score many more tokens: use it to
separate methods whose perplexities are close (GPTQ against round-to-nearest).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from workbench.compression.base import apply_compression
from workbench.models import load_model
from workbench.spec import TechniqueSpec
from workbench.text import evaluation_text, text_hash


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    nll, n = 0.0, 0
    for seg in ids.split(window):
        if len(seg) < 2:
            continue
        logits = model(seg, torch.arange(len(seg), device=seg.device)).logits
        nll += float(F.cross_entropy(logits[:-1].float(), seg[1:], reduction="sum"))
        n += len(seg) - 1
    return math.exp(nll / n)


def evaluation_ids(loaded, tokens: int) -> torch.Tensor:
    """The first `tokens` token ids of the evaluation text; random test models have no tokenizer: the text's
    bytes as ids."""
    text = evaluation_text()
    if loaded.tokenizer is not None:
        return torch.tensor(loaded.tokenizer(text)["input_ids"][:tokens], device=loaded.device)
    return torch.tensor(list(text.encode())[:tokens], device=loaded.device) % loaded.config.vocab_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("chains", nargs="*", help="transform chains, e.g. int4:group=64 or gptq+eora:rank=32")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--tokens", type=int, default=16384, help="evaluation tokens scored (from the text's start)")
    p.add_argument("--window", type=int, default=1024, help="tokens per forward")
    args = p.parse_args()

    text = evaluation_text()
    base = load_model(args.model, args.dtype, args.device)
    ids = evaluation_ids(base, args.tokens)
    print(f"model {args.model}  dtype {base.dtype}  device {base.device}  text {text_hash(text)}  "
          f"tokens {len(ids)}  window {args.window}")
    print(f"{'chain':<40} {'perplexity':>10} {'Δ%':>7} {'weight MB':>10} {'apply s':>8}")
    reference = None
    for chain in ["", *args.chains]:
        loaded = load_model(args.model, args.dtype, args.device) if chain else base
        start = time.perf_counter()
        if chain:
            apply_compression(loaded, [TechniqueSpec.parse(t) for t in chain.split("+")])
        seconds = time.perf_counter() - start
        ppl = perplexity(loaded.model, ids, args.window)
        reference = reference or ppl
        print(f"{chain or 'uncompressed':<40} {ppl:>10.4f} {100 * (ppl / reference - 1):>+7.2f} "
              f"{loaded.weight_bytes() / 1e6:>10.2f} {seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
