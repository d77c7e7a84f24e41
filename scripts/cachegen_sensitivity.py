"""What CacheGen's encoder costs, and where: per-layer sensitivity, keys against values, token-wise locality.

    .venv/bin/python scripts/cachegen_sensitivity.py --context 2048 --scored 256 --layer-bits 2 \
        --variants 3/3/0/1 4/3/0/0 4/2/0/0 3/3/1/1 --out docs/results/cachegen_sensitivity.json

One evaluation window of `workbench.text`: the first `--context` tokens are prefilled, their K and V are taken
from every layer, and `--scored` tokens after them are scored in one forward over a cache holding the context's
K and V as given. Against the untouched cache (same process): the perplexity change and the mean KL of each
cache that went through `workbench.cache.cachegen`'s encoder and decoder

- one layer at a time at `--layer-bits` (every other layer exact): the layer-wise sensitivity CacheGen's
  bit allocation relies on;
- every layer, per variant "KBITS/VBITS/PRE_ROPE/FIRST": keys and values at their own bits, keys un-rotated
  (RoPE inverted at their positions) before coding when PRE_ROPE is 1, the first third of the layers one bit
  finer when FIRST is 1 (the policy's rule; 3/3/0/1 is its default), with the file's share of the float16 cache.

Also the token-wise locality: per layer, the standard deviation of consecutive tokens' differences against that
of the tokens themselves (CacheGen's deltas pay off only where the first is well below the second).
"""

from __future__ import annotations

import argparse
import json
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


def round_trip(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, int]:
    """x [heads, n, dim] through CacheGen's encoder and decoder: (what the decoder gives, bytes coded)."""
    encoder = constriction.stream.queue.RangeEncoder()
    side = cachegen.encode_tensor(x, group, bits, encoder)
    stream = encoder.get_compressed()
    decoder = constriction.stream.queue.RangeDecoder(stream)
    return cachegen.decode_tensor(decoder, side, *x.shape, group), stream.nbytes + len(side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--scored", type=int, default=256)
    parser.add_argument("--group", type=int, default=10, help="CacheGen's tokens per group")
    parser.add_argument("--layer-bits", type=int, default=2, help="bits of the one layer coded at a time")
    parser.add_argument("--variants", nargs="*", default=["3/3/0/1", "4/3/0/0", "4/2/0/0", "3/3/1/1"])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    load_before, start = os.getloadavg(), time.time()
    wb = Workbench(args.model)
    model = wb.model(wb.default).model
    ids = torch.tensor(evaluation_windows(wb.model(wb.default), args.context + args.scored, 1)[0])
    n = args.context
    positions = torch.arange(n)

    def cache_of(kvs):
        cache = build_cache(model, [], n + args.scored)
        if kvs is None:
            model.forward(ids[:n], positions, cache, last_only=True)
        else:
            for layer, (k, v) in zip(cache.layers, kvs):
                layer.append(k.to(layer.k), v.to(layer.v), positions)
        cache.commit()
        return cache

    def logprobs(kvs):
        out = model.forward(ids[n:-1], torch.arange(n, n + args.scored - 1), cache_of(kvs))
        return torch.log_softmax(out.logits.float(), -1)

    exact = [tuple(t[:, :n].float().clone() for t in layer.view()) for layer in cache_of(None).layers]
    layers = len(exact)
    raw = layers * 2 * exact[0][0].numel() * 2  # float16 bytes of the context's K and V
    reference, targets = logprobs(exact), ids[n + 1:]
    ref_nll = -reference.gather(1, targets[:, None]).mean()

    def quality(kvs) -> dict:
        lp = logprobs(kvs)
        nll = -lp.gather(1, targets[:, None]).mean()
        return {"delta_ppl_pct": 100 * (float((nll - ref_nll).exp()) - 1),
                "kl": float((reference.exp() * (reference - lp)).sum(-1).mean())}

    locality = [{"layer": i, **{f"{name}_diff_over_std": float((x[:, 1:] - x[:, :-1]).std(1).mean() / x.std(1).mean())
                                for name, x in zip("kv", pair)}} for i, pair in enumerate(exact)]
    per_layer = []
    for i in tqdm(range(layers), desc="one layer at a time"):
        kvs = list(exact)
        kvs[i] = tuple(round_trip(x, args.layer_bits, args.group)[0] for x in exact[i])
        per_layer.append({"layer": i, "bits": args.layer_bits, **quality(kvs)})
    variants = []
    for variant in tqdm(args.variants, desc="variants"):
        k_bits, v_bits, pre_rope, first = map(int, variant.split("/"))
        kvs, coded = [], 0
        for i, (k, v) in enumerate(exact):
            extra = first * (3 * i < layers)
            k_in = rotate(k, positions, model.inv_freq.float(), inverse=True) if pre_rope else k
            (k_out, k_bytes), (v_out, v_bytes) = (round_trip(k_in, k_bits + extra, args.group),
                                                  round_trip(v, v_bits + extra, args.group))
            kvs.append((rotate(k_out, positions, model.inv_freq.float()) if pre_rope else k_out, v_out))
            coded += k_bytes + v_bytes
        keys_only = quality([(ko, ve) for (ko, _), (_, ve) in zip(kvs, exact)])
        variants.append({"variant": variant, "file_share": coded / raw, **quality(kvs),
                         "keys_only": keys_only, "values_only": quality([(ke, vo) for (_, vo), (ke, _) in
                                                                          zip(kvs, exact)])})
    result = {"command": "python scripts/cachegen_sensitivity.py " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
                  for k, v in vars(args).items() if k not in ("out", "model")),
              "reference_perplexity": float(ref_nll.exp()), "locality": locality, "per_layer": per_layer,
              "variants": variants, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "seconds": round(time.time() - start)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("reference_perplexity", "variants")}, indent=1))
    for row in per_layer:
        print(f"layer {row['layer']:2} alone at {row['bits']} bits: {row['delta_ppl_pct']:+.2f}% ppl, "
              f"KL {row['kl']:.4f}")


if __name__ == "__main__":
    main()
