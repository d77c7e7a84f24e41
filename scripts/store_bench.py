"""Time the store with many runs: writing them, listing runs and reading the summary views.

    .venv/bin/python scripts/store_bench.py --runs 1000 --max-new-tokens 64

A few real runs (plain and prompt lookup, tiny random model) are generated once and written again under
fresh run ids, so the store holds `--runs` complete runs with all their steps, tokens and draft nodes
without spending minutes of CPU on generation. Prints one JSON object of timings (seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
import uuid
from pathlib import Path

import torch

from workbench import Workbench
from workbench.store import Reader, Store


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--store", help="store file (default: a fresh temporary file)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    wb = Workbench("random:llama", dtype="float32")
    prompt = " ".join(["5 6 7 8"] * 8)
    templates = [wb.generate(prompt, f"max_new_tokens={args.max_new_tokens};decode={d}")
                 for d in ("plain", "prompt_lookup:k=4", "prompt_lookup:k=8")]
    path = Path(args.store) if args.store else Path(tempfile.mkdtemp()) / "runs.duckdb"

    t0 = time.perf_counter()
    with Store(path) as store:
        for i in range(args.runs):
            trace = dataclasses.replace(templates[i % len(templates)], run_id=uuid.uuid4().hex[:16],
                                        created_at=time.time(), status="running")
            store.begin(trace)
            trace.status = "done"
            store.finish(trace)
    write_s = time.perf_counter() - t0

    with Reader(path) as reader:
        n_runs = reader.query("SELECT count(*) AS n FROM runs").column("n")[0].as_py()
        n_tokens = reader.query("SELECT count(*) AS n FROM tokens").column("n")[0].as_py()
        some_id = reader.runs(1).column("run_id")[0].as_py()
        result = {
            "runs": n_runs, "tokens": n_tokens, "store_mib": round(path.stat().st_size / 2**20, 1),
            "write_per_run_ms": round(1000 * write_s / args.runs, 2),
            "list_runs_s": best_of(lambda: reader.runs(20)),
            "show_one_run_s": best_of(lambda: reader.run(some_id)),
            "run_summary_all_s": best_of(lambda: reader.query("SELECT * FROM run_summary")),
            "technique_comparison_s": best_of(lambda: reader.query("SELECT * FROM technique_comparison")),
        }
    open_s = best_of(lambda: Reader(path).close())
    result["open_reader_s"] = open_s
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
