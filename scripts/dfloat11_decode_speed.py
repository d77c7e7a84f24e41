"""DFloat11's CPU decoders, in one run: the C kernel (kernels/cpu_dfloat11.c) against the vectorised torch decoder
it replaced, on whole weights, and a short greedy generation of the embedded model compressed with dfloat11.

    .venv/bin/python scripts/dfloat11_decode_speed.py --json docs/results/dfloat11_decode_cpu.json

Weights are random bf16 (normal, std 0.02, exponents distributed like a trained model's) of the embedded model's
shapes (576x1536, 1536x576 and the 49152x576 tied head) and the issue's 4096x4096; each decoder decodes each
weight `--repeats` times, alternating, and the median is kept. Both decoders' outputs are checked equal to the
weight bit for bit. The generation (`--tokens`, 0 skips it; few, since the torch decoder takes about a minute
a token on two cores) times the same dfloat11 model with each decoder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from unittest import mock

import torch
from tqdm import tqdm

from workbench.compression import dfloat11
from workbench.compression.dfloat11 import DFloat11Linear
from workbench.kernels import cpu_dfloat11

SHAPES = [(576, 1536), (1536, 576), (49152, 576), (4096, 4096)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def torch_decoder():
    """The torch decoder: the C kernel reported unavailable while the block runs."""
    return mock.patch.object(dfloat11.cpu_dfloat11, "available", lambda: False)


def weights(shapes, repeats: int) -> list[dict]:
    rows = []
    for shape in tqdm(shapes, desc="weights"):
        w = (torch.randn(shape) * 0.02).bfloat16()
        layer = DFloat11Linear(w, None)
        c_times, torch_times = [], []
        for _ in range(repeats):
            c_times.append(timed(layer.dequantized_weight))
            with torch_decoder():
                torch_times.append(timed(layer.dequantized_weight))
        exact = torch.equal(layer.dequantized_weight().view(torch.int16), w.view(torch.int16))
        with torch_decoder():
            exact = exact and torch.equal(layer.dequantized_weight().view(torch.int16), w.view(torch.int16))
        c, t = statistics.median(c_times), statistics.median(torch_times)
        rows.append({"shape": list(shape), "c_ms": round(c * 1e3, 2), "torch_ms": round(t * 1e3, 2),
                     "speedup": round(t / c, 1), "c_weights_per_s": round(w.numel() / c / 1e6, 1),
                     "bit_exact": exact})
        print(f"{shape[0]}x{shape[1]}: C {c * 1e3:.1f} ms, torch {t * 1e3:.1f} ms, {t / c:.1f}x, bit-exact {exact}")
    return rows


def generation(tokens: int) -> dict:
    from workbench.api import Workbench
    from workbench.metrics import summarize

    wb = Workbench(dtype="bfloat16", device="cpu")
    spec = wb.spec("decode=plain;compress=dfloat11", max_new_tokens=tokens, ignore_eos=True, chat=False)
    wb.model(spec)  # encode once, before timing
    prompt = "The history of the printing press"
    runs = {}
    for name in ("c", "torch"):
        if name == "torch":
            with torch_decoder():
                summary = summarize(wb.generate(prompt, spec))
        else:
            summary = summarize(wb.generate(prompt, spec))
        runs[name] = {"decode_tok_per_s": round(summary["decode_tok_per_s"], 3), "tokens": summary["n_new_tokens"]}
    runs["speedup"] = round(runs["c"]["decode_tok_per_s"] / runs["torch"]["decode_tok_per_s"], 1)
    print(f"generation, {tokens} tokens: C {runs['c']['decode_tok_per_s']} tok/s, torch "
          f"{runs['torch']['decode_tok_per_s']} tok/s, {runs['speedup']}x")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in SHAPES), help="e.g. 576x1536,64x64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=4, help="greedy tokens of the embedded model (0: none)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not cpu_dfloat11.available():
        raise SystemExit(f"the C decoder does not run here: {cpu_dfloat11.unavailable_reason()}")
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    result = {"threads": torch.get_num_threads(), "weights": weights(shapes, args.repeats)}
    if args.tokens:
        result["generation"] = generation(args.tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
