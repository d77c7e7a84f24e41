"""Plain decoding under OpenMP's wait settings (spin forever, libgomp's default spin, shorter spins, sleep at
once, one thread), each in a fresh `workbench generate` process, in turns: median tok/s of each and the load
average around them. The workbench sets GOMP_SPINCOUNT=3000 unless the user sets it or OMP_WAIT_POLICY; this
measures what each setting gives on a quiet machine and on a shared one (`--busy N` busy-looping processes).

    .venv/bin/python scripts/thread_wait_ab.py --repeat 2 --out docs/results/thread_wait_quiet.json
    .venv/bin/python scripts/thread_wait_ab.py --repeat 2 --busy 6 --max-new-tokens 48 \
        --out docs/results/thread_wait_busy6.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {"active (spin)": {"OMP_WAIT_POLICY": "ACTIVE"}, "passive (sleep)": {"OMP_WAIT_POLICY": "PASSIVE"},
            "spin 300k (libgomp's default)": {"GOMP_SPINCOUNT": "300000"},
            "spin 30k": {"GOMP_SPINCOUNT": "30000"}, "spin 3k": {"GOMP_SPINCOUNT": "3000"},
            "one thread": {"OMP_NUM_THREADS": "1"}}
PROMPT = "Write a short story about a robot who learns to paint."


def tok_per_s(args: argparse.Namespace, env: dict[str, str]) -> float:
    command = [sys.executable, "-m", "workbench.cli", "generate", args.prompt, "--model", args.model,
               "--max-new-tokens", str(args.max_new_tokens), "--ignore-eos", "--no-store", "--json"]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, **env})
    return json.loads(done.stdout)["decode_tok_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each runs every setting once")
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--busy", type=int, default=0, help="start this many busy-looping processes for the "
                        "measurement: a shared machine, reproducibly")
    args = parser.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        measure(args)
    finally:
        for process in busy:
            process.kill()


def measure(args: argparse.Namespace) -> None:
    speeds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    load_before = os.getloadavg()
    for round_ in range(args.repeat):
        names = list(SETTINGS) if round_ % 2 == 0 else list(reversed(SETTINGS))  # neither always runs first
        for name in names:
            speeds[name].append(tok_per_s(args, SETTINGS[name]))
    load_after = os.getloadavg()
    result = {"command": " ".join(sys.argv), "busy_processes": args.busy, "load_average_before": load_before,
              "load_average_after": load_after,
              "decode_tok_per_s": speeds, "median": {n: statistics.median(v) for n, v in speeds.items()}}
    for name, median in result["median"].items():
        print(f"{name:>30}: {median:7.1f} tok/s (median of {len(speeds[name])}: "
              f"{', '.join(f'{v:.1f}' for v in speeds[name])})")
    print(f"load average: {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
