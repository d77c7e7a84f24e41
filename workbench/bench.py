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
import platform
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from workbench.errors import WorkbenchError
from workbench.eval.prompts import BASELINE_PROMPTS
from workbench.models import LoadedModel
from workbench.models.embedded import EMBEDDED_ALIASES, EMBEDDED_NAME, cache_folder, embedded_gguf_path
from workbench.spec import RunSpec

PEERS = ("transformers",)


def transformers_peer(loaded: LoadedModel, dtype: torch.dtype):
    """transformers' own model class over the same weights the workbench loaded."""
    from transformers import AutoModelForCausalLM

    source = Path(loaded.source)
    if loaded.name.lower() in EMBEDDED_ALIASES:  # the converted cache folder is a plain HF checkpoint
        source = cache_folder(embedded_gguf_path(), EMBEDDED_NAME)
    if source.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=dtype)
    elif source.is_dir():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    else:
        raise WorkbenchError(f"no transformers peer for {loaded.name!r}: it needs a GGUF file or a checkpoint folder")
    return model.to(loaded.device).eval()


def run_baseline_bench(args: argparse.Namespace) -> int:
    from workbench.api import Workbench

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise WorkbenchError(f"unknown peers {sorted(unknown)}; valid: {', '.join(PEERS)}")
    if not 1 <= args.prompts <= len(BASELINE_PROMPTS):
        raise WorkbenchError(f"--prompts must be between 1 and {len(BASELINE_PROMPTS)}")
    wb = Workbench(args.model, args.dtype)
    spec = wb.spec(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    loaded = wb.model(spec)
    peer_models = {}
    for name in peers:
        for dtype_name in args.peer_dtypes.split(","):
            peer_models[f"{name} {dtype_name}"] = transformers_peer(loaded, getattr(torch, dtype_name))
    prompts = [wb.prompt_ids(loaded, p, None) for p in BASELINE_PROMPTS[: args.prompts]]

    # Both engines get the same token ids (the chat template applied once, here).
    engines = {"workbench": lambda ids, n: _ours(wb, spec, ids, n)}
    engines.update({name: (lambda ids, n, m=m: _transformers(m, ids, n)) for name, m in peer_models.items()})

    for run in engines.values():  # warm-up: first calls pay for allocation and thread start-up
        run(prompts[0], 8)
    totals = {name: [0, 0.0] for name in engines}
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
        "machine": f"{platform.machine()} {platform.processor()}".strip(), "torch": torch.__version__,
        "tok_per_s": tok_s,
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


def _ours(wb, spec: RunSpec, ids: list[int], n: int) -> tuple[list[int], float]:
    from workbench.engine import Engine

    loaded = wb.model(spec)
    t0 = time.perf_counter()
    engine = Engine(loaded.model, RunSpec(**{**vars(spec), "max_new_tokens": n}), [], loaded.detokenize)
    tokens = [t for event in engine.run(ids) for t in event.tokens]
    return tokens, time.perf_counter() - t0


@torch.inference_mode()
def _transformers(model, ids: list[int], n: int) -> tuple[list[int], float]:
    inputs = torch.tensor([ids], device=model.device)
    t0 = time.perf_counter()
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0)
    seconds = time.perf_counter() - t0
    return out[0, len(ids):].tolist(), seconds


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
