"""Benchmarks against peers, measured in the same run on the same machine.

`workbench bench --peers transformers` runs the same prompts through the workbench's plain decoding and
through transformers' `generate` with the same weights, greedy, the same number of new tokens (EOS is
ignored on both sides so every run does equal work). Runs alternate between engines so drift in machine
speed hits both alike. Each engine's tok/s is its total new tokens over its total wall time, prefill
included; transformers runs in each of `--peer-dtypes` and the fastest is the one compared against.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import torch
from tqdm import tqdm

from workbench.errors import WorkbenchError
from workbench.eval.llama_cpp_peer import LLAMA_CPP_PEERS, llama_cpp_peer
from workbench.eval.prompts import BASELINE_PROMPTS
from workbench.kernels import dispatch
from workbench.models import LoadedModel
from workbench.models.embedded import EMBEDDED_ALIASES, EMBEDDED_NAME, cache_folder, embedded_gguf_path
from workbench.provenance import provenance
from workbench.spec import RunSpec

WARMUP_PROMPT = "Write two sentences about a lighthouse keeper and the first storm of winter."  # not in the suite

# plain generate; with --decode also its prompt lookup, and assisted generation with the target's first
# --assistant-layers layers as the assistant (the same draft as draft_model:layers=N), and its early-exit
# self-speculation exiting after that many layers (its version of layer_skip / early_exit); and llama.cpp on
# the same GGUF, plain and with its prompt lookup (eval/llama_cpp_peer.py)
PEERS = ("transformers", "transformers-pld", "transformers-assisted", "transformers-early-exit", *LLAMA_CPP_PEERS)


def transformers_peer(loaded: LoadedModel, dtype: torch.dtype, layers: int | None = None):
    """transformers' own model class over the same weights the workbench loaded (only the first `layers`
    layers when given: a shallow copy of the target, to serve as an assistant)."""
    from transformers import AutoModelForCausalLM

    source = Path(loaded.source)
    if loaded.name.lower() in EMBEDDED_ALIASES:  # the converted cache folder is a plain HF checkpoint
        source = cache_folder(embedded_gguf_path(), EMBEDDED_NAME)
    shallow = {} if layers is None else {"num_hidden_layers": layers}
    if source.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=dtype, **shallow)
    elif source.is_dir():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **shallow)
    else:
        raise WorkbenchError(f"no transformers peer for {loaded.name!r}: it needs a GGUF file or a checkpoint folder")
    return model.to(loaded.device).eval()


def run_baseline_bench(args: argparse.Namespace, store=None) -> int:
    from workbench.api import Workbench, hardware_description

    peers = [p for p in _peers(args) if p == "transformers"]
    if not 1 <= args.prompts <= len(BASELINE_PROMPTS):
        raise WorkbenchError(f"--prompts must be between 1 and {len(BASELINE_PROMPTS)}")
    wb = Workbench(args.model, args.dtype, args.device, store=store, freeze_gc=True)
    spec = wb.spec(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    loaded = wb.model(spec)
    peer_models = {}
    for name in peers:
        for dtype_name in args.peer_dtypes.split(","):
            peer_models[f"{name} {dtype_name}"] = transformers_peer(loaded, getattr(torch, dtype_name))
    texts = BASELINE_PROMPTS[: args.prompts]
    prompts = [wb.prompt_ids(loaded, p, None) for p in texts]

    # Both engines see the same token ids: the workbench tokenizes each prompt with the chat template exactly
    # as `prompts` above were made, and its time is its run's (tokenizing excluded, as for the peer).
    by_ids = {tuple(ids): text for ids, text in zip(prompts, texts)}
    engines = {"workbench": lambda ids, n: _ours(wb, spec, by_ids[tuple(ids)], n)}
    engines.update({name: (lambda ids, n, m=m: _transformers(m, ids, n)) for name, m in peer_models.items()})

    for run in engines.values():  # warm-up: first calls pay for allocation and thread start-up
        run(prompts[0], 8)
    totals = {name: [0, 0.0] for name in engines}
    with dispatch.recording() as used:  # which backend ran each operation (provenance)
        per_prompt = [{name: [0, 0.0] for name in engines} for _ in prompts]
        first_tokens: dict[str, list[list[int]]] = {name: [] for name in engines}
        bar = tqdm(total=len(prompts) * args.repeats * len(engines), desc="bench", unit="run")
        for p, ids in enumerate(prompts):
            for r in range(args.repeats):
                order = list(engines) if r % 2 == 0 else list(reversed(engines))  # alternate who goes first
                for name in order:
                    tokens, seconds = engines[name](ids, args.max_new_tokens)
                    for acc in (totals[name], per_prompt[p][name]):
                        acc[0] += len(tokens)
                        acc[1] += seconds
                    if r == 0:
                        first_tokens[name].append(tokens)
                    bar.update(1)
    bar.close()

    tok_s = {name: n / s for name, (n, s) in totals.items()}
    best_peer = max((n for n in engines if n != "workbench"), key=tok_s.get, default=None)
    result: dict[str, Any] = {
        "model": loaded.name, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
        "prompts": len(prompts), "repeats": args.repeats, "threads": torch.get_num_threads(),
        "machine": hardware_description(loaded.device), "torch": torch.__version__,
        "provenance": provenance(loaded.model, loaded.device, loaded.dtype, used),
        "tok_per_s": tok_s,
        "simulated": [r.name for r in loaded.compression if r.simulated],  # the workbench's (none without compress)
        "per_prompt": [{"prompt_tokens": len(ids), **{name: n / s for name, (n, s) in row.items()}}
                       for ids, row in zip(prompts, per_prompt)],
    }
    print(f"\n{'prompt tokens':<16}" + "".join(f"{name:>24}" for name in engines))
    for row in result["per_prompt"]:
        print(f"{row['prompt_tokens']:<16}" + "".join(f"{row[name]:>24.1f}" for name in engines))
    print(f"{'all (tok/s)':<16}" + "".join(f"{tok_s[name]:>24.1f}" for name in engines))
    if best_peer:
        ratio = tok_s["workbench"] / tok_s[best_peer]
        same = _agreement(first_tokens["workbench"], first_tokens[best_peer])
        result.update(fastest_peer=best_peer, speedup=ratio, token_agreement_with_fastest_peer=same)
        print(f"\nworkbench / {best_peer}: {ratio:.2f}x   (greedy tokens identical to it: {same:.0%})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _peers(args: argparse.Namespace) -> list[str]:
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise WorkbenchError(f"unknown peers {sorted(unknown)}; valid: {', '.join(PEERS)}")
    return peers


def _ours(wb, spec: RunSpec, prompt: str, n: int) -> tuple[list[int], float]:
    trace = wb.generate(prompt, spec, max_new_tokens=n)
    return trace.token_ids, trace.summary()["total_s"]


@torch.inference_mode()
def _transformers(model, ids: list[int], n: int) -> tuple[list[int], float]:
    inputs = torch.tensor([ids], device=model.device)
    t0 = time.perf_counter()
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0)
    _sync(model.device)
    seconds = time.perf_counter() - t0
    return out[0, len(ids):].tolist(), seconds


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall times cover it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of token positions where two engines' greedy outputs agree, up to the first divergence."""
    same = total = 0
    for x, y in zip(a, b):
        total += len(x)
        for s, t in zip(x, y):
            if s != t:
                break
            same += 1
    return same / total if total else 0.0


def run_decoding_bench(args: argparse.Namespace, store=None) -> int:
    """`workbench bench --decode A --decode B ...`: each drafter over the prompt suite, greedy, against the
    workbench's own plain decoding in the same run, and against transformers' prompt lookup when asked.

    Per category and technique: tok/s (new tokens over wall time, prefill included), mean accepted length
    (new tokens per target forward), speed-up (tok/s over plain decoding's on the same prompts) and
    agreement with plain decoding's tokens (up to the first difference): lossless drafters agree fully in
    float32, while in bf16 batched verification rounds differently from one-token steps.
    Techniques run in turn on each prompt, the order alternating between prompts.
    """
    from workbench.api import Workbench, hardware_description
    from workbench.eval.suite import suite, suite_hash

    decodes = list(dict.fromkeys(["plain", *args.decode]))
    wb = Workbench(args.model, args.dtype, args.device, store=store, freeze_gc=True)
    compress = f";compress={args.compress}" if args.compress else ""
    specs = {d: wb.spec(f"decode={d}{compress}", max_new_tokens=args.max_new_tokens) for d in decodes}
    try:
        prompts = suite(args.categories.split(",") if args.categories else None, args.per_category)
    except ValueError as err:
        raise WorkbenchError(str(err)) from None
    # Each technique keeps its own cross-run memory (token recycling's hot-started matrix), so no technique
    # drafts from what another just generated for the same prompt.
    memories: dict[str, dict] = {d: {} for d in decodes}
    labels: dict[str, dict[str, Any]] = {}  # per technique: lossless, simulated, warm_start over its measured runs
    engines: dict[str, Any] = {d: (lambda prompt, d=d: _suite_run(wb, prompt, specs[d], memories[d], labels, d))
                               for d in decodes}
    peers = _peers(args)
    if {"transformers-pld", "transformers-assisted", "transformers-early-exit"} & set(peers):
        loaded = wb.model(specs["plain"])
        peer = transformers_peer(loaded, loaded.dtype)
        ids = lambda prompt: wb.prompt_ids(loaded, prompt, None)  # noqa: E731
        if "transformers-pld" in peers:
            engines["transformers prompt lookup"] = lambda prompt: _transformers_generate(
                peer, ids(prompt), args.max_new_tokens, prompt_lookup_num_tokens=10)
        if "transformers-assisted" in peers:
            assistant = transformers_peer(loaded, loaded.dtype, layers=args.assistant_layers)
            engines[f"transformers assisted ({args.assistant_layers} layers)"] = lambda prompt: _transformers_generate(
                peer, ids(prompt), args.max_new_tokens, assistant_model=assistant)
        if "transformers-early-exit" in peers:
            name = f"transformers early exit ({args.assistant_layers} layers)"
            engines[name] = lambda prompt: _transformers_generate(
                peer, ids(prompt), args.max_new_tokens, assistant_early_exit=args.assistant_layers)
    for name in [p for p in peers if p in LLAMA_CPP_PEERS]:
        loaded = wb.model(specs["plain"])
        gguf = embedded_gguf_path() if loaded.name.lower() in EMBEDDED_ALIASES else Path(loaded.source)
        run = llama_cpp_peer(gguf, prompt_lookup=name == "llama-cpp-pld")
        label = f"llama.cpp {gguf.stem.rsplit('.', 1)[-1]}" + (" prompt lookup" if name == "llama-cpp-pld" else "")
        engines[label] = lambda prompt, run=run, loaded=loaded: run(wb.prompt_ids(loaded, prompt, None),
                                                                     args.max_new_tokens)

    for run in engines.values():  # warm-up, on a text outside the suite: a run on prompt 0 would leak its output
        run(WARMUP_PROMPT)       # into the drafts of prompt 0's measured run
    labels.clear()
    totals: dict[tuple[str, str], list[float]] = {}
    with dispatch.recording() as used:  # which backend ran each operation (provenance)
        outputs: dict[tuple[str, str], list[int]] = {}
        bar = tqdm(total=len(prompts) * len(engines), desc="bench", unit="run")
        for i, item in enumerate(prompts):
            for name in (list(engines) if i % 2 == 0 else list(reversed(engines))):
                tokens, seconds, forwards, outputs[(item.id, name)] = engines[name](item.prompt)
                for key in ((item.category, name), ("all", name)):
                    acc = totals.setdefault(key, [0, 0.0, 0])
                    acc[0] += tokens
                    acc[1] += seconds
                    acc[2] += forwards
                bar.update(1)
    bar.close()

    categories = list(dict.fromkeys(p.category for p in prompts)) + ["all"]
    rows = []
    for category in categories:
        base = totals[(category, "plain")]
        for name in engines:
            tokens, seconds, forwards = totals[(category, name)]
            same = [_agreement([outputs[(p.id, name)]], [outputs[(p.id, "plain")]])
                    for p in prompts if category in ("all", p.category)]
            rows.append({"category": category, "engine": name, "tok_per_s": tokens / seconds,
                         "mean_accepted_length": tokens / forwards if forwards else None,
                         "speedup": (tokens / seconds) / (base[0] / base[1]),
                         "agreement_with_plain": sum(same) / len(same),
                         # the run's labels (workbench/metrics.py); a peer's are not ours to give
                         **labels.get(name, {"lossless": None, "simulated": [], "warm_start": False})})
    loaded = wb.model(specs["plain"])
    device = loaded.device
    result = {"model": args.model, "dtype": args.dtype, "compress": args.compress,
              "provenance": provenance(loaded.model, loaded.device, loaded.dtype, used),
              "machine": hardware_description(device),
              "max_new_tokens": args.max_new_tokens,
              "suite_hash": suite_hash(), "prompts": len(prompts), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows}
    w = max(map(len, engines)) + 2
    print(f"\n{'category':<15}{'engine':<{w}}{'tok/s':>8}{'accepted':>10}{'speed-up':>10}{'same as plain':>15}")
    for r in rows:
        accepted = f"{r['mean_accepted_length']:.2f}" if r["mean_accepted_length"] else "-"
        simulated = f"  simulated: {', '.join(r['simulated'])}" if r["simulated"] else ""
        print(f"{r['category']:<15}{r['engine']:<{w}}{r['tok_per_s']:>8.1f}{accepted:>10}{r['speedup']:>9.2f}x"
              f"{r['agreement_with_plain']:>14.0%}{simulated}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot:
        _plot_speedups(rows, categories, list(engines), args.plot)
    return 0


def _suite_run(wb, prompt, spec: RunSpec, memory: dict, labels: dict, name: str) -> tuple[int, float, int, list[int]]:
    trace = wb.generate(prompt, spec, memory=memory)
    summary = trace.summary()
    seen = labels.setdefault(name, {"lossless": summary["lossless"], "simulated": [], "warm_start": False})
    seen["simulated"] = sorted({*seen["simulated"], *summary["simulated"]})
    seen["warm_start"] = seen["warm_start"] or summary["warm_start"]
    return summary["n_new_tokens"], summary["total_s"], summary["target_forwards"], trace.token_ids


@torch.inference_mode()
def _transformers_generate(model, ids: list[int], n: int, **options: Any) -> tuple[int, float, int, list[int]]:
    """transformers' `generate` with `options` (prompt lookup, an assistant model), greedy, stopping at EOS
    like ours."""
    inputs = torch.tensor([ids], device=model.device)
    t0 = time.perf_counter()
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False, max_new_tokens=n,
                         pad_token_id=0, **options)
    _sync(model.device)
    seconds = time.perf_counter() - t0
    return out.shape[1] - len(ids), seconds, 0, out[0, len(ids):].tolist()


def _plot_speedups(rows: list[dict[str, Any]], categories: list[str], engines: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [e for e in engines if e != "plain"]
    fig, ax = plt.subplots(figsize=(1.4 * len(categories) + 2, 4.5))
    width = 0.8 / max(1, len(shown))
    for j, engine in enumerate(shown):
        values = [next(r["speedup"] for r in rows if r["category"] == c and r["engine"] == engine) for c in categories]
        ax.bar([i + j * width for i in range(len(categories))], values, width, label=unquote(engine))
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.set_xticks([i + width * (len(shown) - 1) / 2 for i in range(len(categories))], categories)
    ax.set_ylabel("speed-up over plain decoding")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(4, len(shown)), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
