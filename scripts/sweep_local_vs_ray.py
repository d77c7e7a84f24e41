"""The same sweep locally and on a local Ray instance, each in its own `workbench sweep` process and its own
store, in turns (local, Ray, Ray, local, ... so neither always runs first): wall time, cells per minute, model
load per worker, per-cell time outside the runs, and whether every cell generated the same token ids in
both modes (greedy and sampled cells counted apart).

    .venv/bin/python scripts/sweep_local_vs_ray.py --repeat 2 --out docs/results/sweep_local_vs_ray.json

The default grid is docs/sweeps.md's 48 cells: 4 specs x 6 prompts (qa and math, 3 each) x 2 seeds,
32 new tokens, on the embedded model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb

SPECS = ["", "decode=prompt_lookup:k=8", "cache=h2o", "temperature=0.7"]
TOKENS = """SELECT c.cell_key, r.temperature = 0 AS greedy, list(t.token_id ORDER BY t.position) AS ids
  FROM sweep_cells c JOIN run_summary r USING (run_id) JOIN tokens t USING (run_id)
  WHERE c.status = 'done' AND t.source <> 'prompt' GROUP BY ALL"""


def sweep(args: argparse.Namespace, store: Path, ray: bool) -> dict:
    report = store.with_suffix(".json")
    command = [sys.executable, "-m", "workbench.cli", "sweep", *[f"--spec={s}" for s in args.spec or SPECS],
               "--max-new-tokens", str(args.max_new_tokens), "--seeds", args.seeds, "--name", "local-vs-ray",
               "--model", args.model, "--store", str(store), "--json", str(report), "--no-progress"]
    command += ["--prompts", args.prompts] if args.prompts else ["--suite", args.suite, "--per-category",
                                                                 str(args.per_category)]
    command += ["--ray", "--workers", str(args.workers)] if ray else []
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    return {"mode": "ray" if ray else "local", **json.loads(report.read_text())}


def tokens(store: Path) -> dict[str, tuple[bool, list[int]]]:
    with duckdb.connect(str(store), read_only=True) as con:
        return {key: (greedy, ids) for key, greedy, ids in con.execute(TOKENS).fetchall()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--spec", action="append", help=f"specs of the grid (default: {SPECS})")
    parser.add_argument("--suite", default="qa,math")
    parser.add_argument("--per-category", type=int, default=3)
    parser.add_argument("--prompts", help="a prompts file instead of the suite")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="pairs of sweeps, in alternating order")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    runs, compared = [], None
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.repeat):
            for ray in ((False, True) if i % 2 == 0 else (True, False)):
                store = Path(folder) / f"{'ray' if ray else 'local'}-{i}.duckdb"
                runs.append(sweep(args, store, ray))
                print(f"{runs[-1]['mode']:>5}: {runs[-1]['wall_s']:.1f} s, {runs[-1]['cells_per_min']:.1f} cells/min,"
                      f" model load {', '.join(f'{s:.1f}' for s in runs[-1]['load_s_per_worker'])} s, "
                      f"{runs[-1]['overhead_s_per_cell'] * 1000:.0f} ms per cell outside the runs, "
                      f"load average {runs[-1]['load_average_1_5_15_min'][0]:.1f}", flush=True)
        local, ray = tokens(Path(folder) / "local-0.duckdb"), tokens(Path(folder) / "ray-0.duckdb")
        differing = sorted(k for k in local.keys() | ray.keys() if local.get(k) != ray.get(k))
        greedy = [k for k, (g, _) in local.items() if g]
        compared = {"cells_compared": len(local), "greedy_cells": len(greedy),
                    "greedy_identical": sum(local[k] == ray.get(k) for k in greedy),
                    "sampled_cells": len(local) - len(greedy),
                    "sampled_identical": sum(local[k] == ray.get(k) for k in local if k not in greedy),
                    "differing_cells": differing}
    print(f"identical tokens: {compared['greedy_identical']}/{compared['greedy_cells']} greedy cells, "
          f"{compared['sampled_identical']}/{compared['sampled_cells']} sampled cells")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "runs": runs, "identity": compared},
                                             indent=1) + "\n")


if __name__ == "__main__":
    main()
