"""ShadowKV, LServe and CacheGen against the full cache and an existing policy on the long-context suite, in one run.

    .venv/bin/python scripts/long_context_cache.py [--per-cell 2] [--lengths 2048 4096 7168] [--specs lserve ...] \
        [--tasks passkey kv]

For every retrieval prompt (passkey, key-value) of `workbench.eval.long_context` and every spec (taking turns per
prompt, so machine load falls on all alike): the answer's score, the fast-tier bytes after the prefill
(`cache_bytes`, against the full cache's in the same run), the off-tier bytes, what was fetched back, and the
decode speed against the full cache's. Then perplexity and KL against the full cache (teacher-forced, on
`workbench.text`'s evaluation windows), and CacheGen's file against the raw float16 cache with the time to load
it against the time to prefill the same tokens, per length. kvpress (`workbench.eval.kvpress_peer`) runs beside
them in the same turns: its presses on transformers' model over the same weights, with the same prompt ids, scored
the same way (retrieval, bytes after the prefill against the full float cache, perplexity and KL against our full
cache). Rows are written to `<out>.partial` after every prompt, so a run cut short keeps what it measured (a
finished run removes it). Writes docs/results/long_context_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from workbench.api import Workbench
from workbench.eval.long_context import long_context_suite, score, token_counter
from workbench.eval.quality import compare, encode, evaluation_windows, teacher_forced
from workbench.provenance import provenance
from workbench.spec import DEFAULT_MODEL, RunSpec

SPECS = {
    "full": "",
    "shadowkv": "cache=shadowkv",
    "snapkv": "cache=snapkv:fraction=0.25,window=32",
    "cachegen": "cache=cachegen",
    "lserve": "cache=lserve",
    "lserve_wide": "cache=lserve:streaming=0.25,budget_tokens=512",
    "lserve_few": "cache=lserve:streaming=0.1,budget_tokens=512",
}
# kvpress presses beside our policies: name -> (our policy whose parameters it takes, spec, kept fraction)
PEERS = {"kvpress_snapkv": ("snapkv", "cache=snapkv:fraction=0.25,window=32", 0.25),
         "kvpress_streaming": ("streaming", "cache=streaming", 0.25)}


def as_prompt(wb: Workbench, text: str) -> str:
    """The text, or for a model without a tokenizer (the smoke test's random model) its byte ids."""
    loaded = wb.model(wb.default)
    return text if loaded.tokenizer is not None else " ".join(map(str, encode(loaded, text)))


def build_presses(names: list[str]) -> dict:
    """name -> kvpress press for each of `names` in PEERS."""
    from workbench.eval.kvpress_peer import press_for

    out = {}
    for name in names:
        ours, spec, budget = PEERS[name]
        out[name] = press_for(ours, RunSpec.parse(spec).cache[0].build("cache"), budget)[0]
    return out


def peer_retrieval(wb: Workbench, peer, item, name: str, press, ids: list[int]) -> dict:
    """One kvpress press on one prompt: its answer's score and its cache's bytes against the full float cache."""
    from workbench.eval.kvpress_peer import peer_generate
    from workbench.eval.quality import decode

    loaded = wb.model(wb.default)
    cfg = loaded.model.config
    start = time.perf_counter()
    tokens, nbytes = peer_generate(peer, press, ids, item.new_tokens)
    full = 2 * cfg.num_layers * cfg.num_kv_heads * len(ids) * cfg.head_dim * peer.dtype.itemsize
    return {"spec": name, "id": item.id, "task": item.task, "length": item.length, "prompt_tokens": len(ids),
            "score": score(item, decode(loaded, tokens)), "fast_bytes_prefill": nbytes, "fast_share": nbytes / full,
            "off_bytes_prefill": 0, "seconds": time.perf_counter() - start, "tokens": tokens}


def retrieval(wb: Workbench, items, specs: dict[str, str], peer=None, presses: dict | None = None,
              partial: Path | None = None) -> list[dict]:
    rows = []
    for item in tqdm(items, desc="retrieval prompts"):
        for name, spec in specs.items():
            trace = wb.generate(as_prompt(wb, item.prompt), f"{spec};max_new_tokens={item.new_tokens};chat=false")
            s = trace.summary()
            rows.append({"spec": name, "id": item.id, "task": item.task, "length": item.length,
                         "prompt_tokens": len(trace.prompt_ids), "score": score(item, trace.text),
                         "fast_bytes_prefill": trace.events[0].cache_bytes,
                         "off_bytes_prefill": trace.events[0].cache_off_bytes,
                         "moved_bytes": s["cache_moved_bytes"], "moved_s": s["cache_moved_s"],
                         "decode_tok_per_s": s["decode_tok_per_s"], "tokens": trace.token_ids})
            ids = trace.prompt_ids
        for name, press in (presses or {}).items():
            rows.append(peer_retrieval(wb, peer, item, name, press, ids))
        if partial:
            partial.write_text(json.dumps(rows, default=str) + "\n")
    return rows


def quality(wb: Workbench, specs: dict[str, str], context: int, windows: int, scored: int, peer=None,
            presses: dict | None = None) -> dict:
    loaded = wb.model(wb.default)
    ids = evaluation_windows(loaded, context + scored, windows)

    def run(spec: str) -> list:
        policies = [t.build("cache") for t in RunSpec.parse(spec).cache] if spec else []
        return [teacher_forced(loaded.model, policies, w, context, loaded.tokenizer, wb.memory(wb.default))
                for w in ids]

    reference = run("")
    out = {name: compare(reference, run(spec)) for name, spec in specs.items() if spec}
    if presses:
        from workbench.eval.kvpress_peer import peer_forced

        full = [peer_forced(peer, None, w, context) for w in ids]
        out["kvpress_full"] = compare(reference, full)
        for name, press in presses.items():
            out[name] = compare(reference, [peer_forced(peer, press, w, context) for w in ids])
    return out


def load_against_prefill(wb: Workbench, items) -> list[dict]:
    """Per length: prefill the document (its prompt less the question's last token) against loading its file."""
    rows = []
    loaded = wb.model(wb.default)
    cfg = loaded.model.config
    with tempfile.TemporaryDirectory() as tmp:
        for item in tqdm(items, desc="cachegen load vs prefill"):
            path = Path(tmp) / f"{item.id}.kvc"
            prompt = as_prompt(wb, item.prompt)
            wb.generate(prompt, f"cache=cachegen:save={path};max_new_tokens=1;chat=false")
            full = wb.generate(prompt, "max_new_tokens=1;chat=false").summary()  # after the save: both warm
            load = wb.generate(prompt, f"cache=cachegen:load={path};max_new_tokens=1;chat=false").summary()
            n = load["kv_loaded_tokens"]
            raw = n * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
            rows.append({"id": item.id, "length": item.length, "loaded_tokens": n, "file_bytes": path.stat().st_size,
                         "raw_fp16_bytes": raw, "file_share": path.stat().st_size / raw,
                         "prefill_s": full["prefill_s"], "load_s": load["kv_load_s"],
                         "rest_prefill_s": load["prefill_s"], "ttft_full_s": full["ttft_s"],
                         "ttft_loaded_s": load["ttft_s"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--per-cell", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 7168])
    parser.add_argument("--tasks", nargs="+", default=["passkey", "kv"], choices=["passkey", "kv"],
                        help="retrieval tasks of the long-context suite")
    parser.add_argument("--context", type=int, default=2048, help="tokens before the scored ones (perplexity, KL)")
    parser.add_argument("--scored", type=int, default=128, help="tokens scored for perplexity and KL")
    parser.add_argument("--specs", nargs="+", default=list(SPECS), choices=list(SPECS),
                        help="which specs to run (full, the reference, always runs)")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS),
                        help="kvpress presses to run beside (none: --peers with no names)")
    parser.add_argument("--out", default="docs/results/long_context_cache.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared, busy machine the "
                        "thread pool's waits on small operations dominate)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    start = time.time()
    wb = Workbench(args.model)
    loaded = wb.model(wb.default)
    count = token_counter(loaded)
    items = long_context_suite(count, args.lengths, tuple(args.tasks), args.per_cell)
    specs = {name: SPECS[name] for name in SPECS if name == "full" or name in args.specs}
    peer, presses = None, build_presses(args.peers)
    if presses:
        from workbench.bench import transformers_peer
        from workbench.errors import WorkbenchError

        try:
            peer = transformers_peer(loaded, loaded.dtype)
        except WorkbenchError as error:  # e.g. a random test model: no checkpoint for transformers to load
            print(f"kvpress left out: {error}")
            presses = {}
    rows = retrieval(wb, items, specs, peer, presses, Path(args.out + ".partial"))
    summary = {}
    for name in [*specs, *presses]:
        mine = [r for r in rows if r["spec"] == name]
        if name in presses:
            summary[name] = {"accuracy": sum(r["score"] for r in mine) / len(mine),
                             "by_length": {str(n): sum(r["score"] for r in mine if r["length"] == n)
                                           / sum(1 for r in mine if r["length"] == n) for n in args.lengths},
                             "fast_bytes_share": sum(r["fast_share"] for r in mine) / len(mine),
                             "off_bytes_share": 0.0}
            continue
        full = {r["id"]: r for r in rows if r["spec"] == "full"}
        summary[name] = {
            "accuracy": sum(r["score"] for r in mine) / len(mine),
            "by_length": {str(n): sum(r["score"] for r in mine if r["length"] == n)
                          / sum(1 for r in mine if r["length"] == n) for n in args.lengths},
            "fast_bytes_share": sum(r["fast_bytes_prefill"] / full[r["id"]]["fast_bytes_prefill"] for r in mine)
            / len(mine),
            "off_bytes_share": sum(r["off_bytes_prefill"] / full[r["id"]]["fast_bytes_prefill"] for r in mine)
            / len(mine),
            "decode_speedup": {str(n): sum(r["decode_tok_per_s"] / full[r["id"]]["decode_tok_per_s"]
                                           for r in mine if r["length"] == n)
                               / sum(1 for r in mine if r["length"] == n) for n in args.lengths},
        }
    result = {
        "command": "python scripts/long_context_cache.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("out", "model")),
        "specs": specs, "peers": {name: repr(press) for name, press in presses.items()}, "summary": summary,
        "quality": quality(wb, specs, args.context, 1, args.scored, peer, presses),
        "cachegen_load": load_against_prefill(wb, [i for i in items if i.task == "kv" and i.id.endswith("-0")])
        if "cachegen" in specs else [],
        "rows": rows,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "seconds": round(time.time() - start), "threads": torch.get_num_threads(),
        "provenance": provenance(loaded.model, loaded.device, loaded.dtype),
    }
    Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    Path(args.out + ".partial").unlink(missing_ok=True)  # the whole run is in `out` now
    print(json.dumps({k: result[k] for k in ("summary", "quality", "cachegen_load")}, indent=1, default=str))


if __name__ == "__main__":
    main()
