"""Time the store with many runs: recording each run, listing runs and reading the summary views.

    .venv/bin/python -m workbench.store.bench --runs 2500 --max-new-tokens 64

A few real runs (plain and prompt lookup, tiny random model) are generated once and recorded again under
fresh run ids, so the store holds `--runs` complete runs with all their steps, tokens and draft nodes
without spending minutes of CPU on generation. Prints one JSON object: the cost of recording one run
(`begin` + `finish`) over the first and the last tenth of the runs (median and 90th percentile, ms), so a
cost that grows with the store shows, and the read timings (best of five, seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _ms(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"median_ms": round(1000 * statistics.median(ordered), 2),
            "p90_ms": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2500)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--store", help="store file (default: a fresh temporary file)")
    args = parser.parse_args()

    import torch

    from workbench import Workbench
    from workbench.store import Reader, Store

    torch.set_num_threads(1)
    wb = Workbench("random:llama", dtype="float32")
    prompt = " ".join(["5 6 7 8"] * 8)
    templates = [wb.generate(prompt, f"max_new_tokens={args.max_new_tokens};decode={d}")
                 for d in ("plain", "prompt_lookup:k=4", "prompt_lookup:k=8")]
    path = Path(args.store) if args.store else Path(tempfile.mkdtemp()) / "runs.duckdb"

    per_run = []
    with Store(path) as store:
        for i in range(args.runs):
            trace = dataclasses.replace(templates[i % len(templates)], run_id=uuid.uuid4().hex[:16],
                                        created_at=time.time(), status="running")
            t0 = time.perf_counter()
            store.begin(trace)
            trace.status = "done"
            store.finish(trace)
            per_run.append(time.perf_counter() - t0)
    tenth = max(1, args.runs // 10)

    with Reader(path) as reader:
        n_tokens = reader.query("SELECT count(*) AS n FROM tokens").column("n")[0].as_py()
        some_id = reader.runs(1).column("run_id")[0].as_py()
        result = {
            "runs": args.runs, "tokens": n_tokens, "store_mib": round(path.stat().st_size / 2**20, 1),
            "record_run_first_tenth": _ms(per_run[:tenth]), "record_run_last_tenth": _ms(per_run[-tenth:]),
            "list_runs_s": best_of(lambda: reader.runs(20)),
            "show_one_run_s": best_of(lambda: reader.run(some_id)),
            "run_summary_all_s": best_of(lambda: reader.query("SELECT * FROM run_summary")),
            "technique_comparison_s": best_of(lambda: reader.query("SELECT * FROM technique_comparison")),
        }
    result["open_reader_s"] = best_of(lambda: Reader(path).close())
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
