"""What CacheGen's encoder costs, and where: per-layer sensitivity, keys against values, sinks, token-wise locality.

    .venv/bin/python scripts/cachegen_sensitivity.py --context 2048 --scored 256 --windows 4 --layer-bits 2 \
        --variants 4/3/0/0/4 4/3/0/0/0 3/3/0/1/0 3/3/0/1/4 4/2/0/0/4 3/3/1/1/0 \
        --out docs/results/cachegen_sensitivity.json

`--windows` consecutive evaluation windows of `workbench.text`: in each, the first `--context` tokens are
prefilled, their K and V are taken from every layer, and `--scored` tokens after them are scored in one forward
over a cache holding the context's K and V as given. Against the untouched cache (same process, same windows):
the perplexity change over all scored tokens and the mean KL of each cache that went through
`workbench.cache.cachegen`'s encoder and decoder

- one layer at a time at `--layer-bits` (every other layer exact, no sinks kept): the layer-wise sensitivity
  CacheGen's bit allocation relies on;
- every layer, per variant "KBITS/VBITS/PRE_ROPE/FIRST/SINKS": keys and values at their own bits, keys
  un-rotated (RoPE inverted at their positions) before coding when PRE_ROPE is 1, the first third of the layers
  one bit finer when FIRST is 1, the first SINKS tokens kept in float16 (the policy's defaults are 4/3/0/0/4),
  with the file's share of the float16 cache.

Also the token-wise locality: per layer, the standard deviation of consecutive tokens' differences against that
of the tokens themselves (CacheGen's deltas pay off only where the first is well below the second).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import constriction
import torch
from tqdm import tqdm

from workbench.api import Workbench
from workbench.cache import cachegen
from workbench.cache.shadowkv import rotate
from workbench.engine import build_cache
from workbench.eval.quality import evaluation_windows
from workbench.spec import DEFAULT_MODEL


def round_trip(x: torch.Tensor, bits: int, group: int, sinks: int = 0) -> tuple[torch.Tensor, int]:
    """x [heads, n, dim] through CacheGen's encoder and decoder: (what the decoder gives, bytes coded)."""
    encoder = constriction.stream.queue.RangeEncoder()
    side = cachegen.encode_tensor(x, group, bits, encoder, sinks)
    stream = encoder.get_compressed()
    decoder = constriction.stream.queue.RangeDecoder(stream)
    return cachegen.decode_tensor(decoder, side, *x.shape, group), stream.nbytes + len(side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--scored", type=int, default=256)
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows, pooled")
    parser.add_argument("--group", type=int, default=10, help="CacheGen's tokens per group")
    parser.add_argument("--layer-bits", type=int, default=2, help="bits of the one layer coded at a time")
    parser.add_argument("--variants", nargs="*", default=["4/3/0/0/4", "4/3/0/0/0", "3/3/0/1/0"])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.windows < 1:
        parser.error("--windows must be at least 1")
    for variant in args.variants:
        if len(variant.split("/")) != 5 or not all(part.isdigit() for part in variant.split("/")):
            parser.error(f"variant {variant!r}: give KBITS/VBITS/PRE_ROPE/FIRST/SINKS, e.g. 4/3/0/0/4")
    load_before, start = os.getloadavg(), time.time()
    wb = Workbench(args.model)
    model = wb.model(wb.default).model
    n = args.context
    positions = torch.arange(n)
    windows = evaluation_windows(wb.model(wb.default), n + args.scored, args.windows)
    # per measured cache: summed NLL change and KL over every window's scored tokens
    totals: dict[str, list[float]] = {}

    def add(name: str, kvs, window) -> None:
        ids, reference, ref_nll = window
        cache = build_cache(model, [], n + args.scored)
        for layer, (k, v) in zip(cache.layers, kvs):
            layer.append(k.to(layer.k), v.to(layer.v), positions)
        cache.commit()
        lp = torch.log_softmax(model.forward(ids[n:-1], torch.arange(n, n + args.scored - 1), cache).logits.float(),
                               -1)
        nll = -lp.gather(1, ids[n + 1:, None]).sum()
        kl = (reference.exp() * (reference - lp)).sum()
        row = totals.setdefault(name, [0.0, 0.0, 0])
        row[0] += float(nll - ref_nll)
        row[1] += float(kl)
        row[2] += args.scored - 1

    def quality(name: str) -> dict:
        d_nll, kl, count = totals[name]
        return {"delta_ppl_pct": 100 * (math.exp(d_nll / count) - 1), "kl": kl / count}

    ref_nll_sum, ref_count, locality, file_share = 0.0, 0, [], {}
    for ids in tqdm(windows, desc="windows"):
        ids = torch.tensor(ids)
        cache = build_cache(model, [], n + args.scored)
        model.forward(ids[:n], positions, cache, last_only=True)
        cache.commit()
        exact = [tuple(t[:, :n].float().clone() for t in layer.view()) for layer in cache.layers]
        out = model.forward(ids[n:-1], torch.arange(n, n + args.scored - 1), cache)
        reference = torch.log_softmax(out.logits.float(), -1)
        ref_nll = -reference.gather(1, ids[n + 1:, None]).sum()
        ref_nll_sum, ref_count = ref_nll_sum + float(ref_nll), ref_count + args.scored - 1
        window = ids, reference, ref_nll
        layers = len(exact)
        raw = layers * 2 * exact[0][0].numel() * 2  # float16 bytes of the context's K and V
        locality.append([{name: float((x[:, 1:] - x[:, :-1]).std(1).mean() / x.std(1).mean())
                          for name, x in zip("kv", pair)} for pair in exact])
        for i in range(layers):
            kvs = list(exact)
            kvs[i] = tuple(round_trip(x, args.layer_bits, args.group)[0] for x in exact[i])
            add(f"layer {i}", kvs, window)
        for variant in args.variants:
            k_bits, v_bits, pre_rope, first, sinks = map(int, variant.split("/"))
            kvs, coded = [], 0
            for i, (k, v) in enumerate(exact):
                extra = first * (3 * i < layers)
                k_in = rotate(k, positions, model.inv_freq.float(), inverse=True) if pre_rope else k
                (k_out, k_bytes), (v_out, v_bytes) = (round_trip(k_in, k_bits + extra, args.group, sinks),
                                                      round_trip(v, v_bits + extra, args.group, sinks))
                kvs.append((rotate(k_out, positions, model.inv_freq.float()) if pre_rope else k_out, v_out))
                coded += k_bytes + v_bytes
            file_share.setdefault(variant, []).append(coded / raw)
            add(variant, kvs, window)
            add(variant + " keys", [(ko, ve) for (ko, _), (_, ve) in zip(kvs, exact)], window)
            add(variant + " values", [(ke, vo) for (_, vo), (ke, _) in zip(kvs, exact)], window)
    variants = [{"variant": v, "file_share": sum(file_share[v]) / len(file_share[v]), **quality(v),
                 "keys_only": quality(v + " keys"), "values_only": quality(v + " values")} for v in args.variants]
    per_layer = [{"layer": i, "bits": args.layer_bits, **quality(f"layer {i}")} for i in range(layers)]
    result = {"command": "python scripts/cachegen_sensitivity.py " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
                  for k, v in vars(args).items() if k not in ("out", "model")),
              "reference_perplexity": math.exp(ref_nll_sum / ref_count), "scored_tokens": ref_count,
              "locality": [{"layer": i, **{f"{name}_diff_over_std": sum(w[i][name] for w in locality) / len(locality)
                                           for name in "kv"}} for i in range(layers)],
              "per_layer": per_layer, "variants": variants, "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "seconds": round(time.time() - start)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("reference_perplexity", "variants")}, indent=1))
    for row in per_layer:
        print(f"layer {row['layer']:2} alone at {row['bits']} bits: {row['delta_ppl_pct']:+.2f}% ppl, "
              f"KL {row['kl']:.4f}")


if __name__ == "__main__":
    main()
