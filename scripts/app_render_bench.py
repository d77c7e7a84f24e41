"""How smoothly the app renders a race in Debian's headless Chromium (docs/app.md, "Rendering").

    .venv/bin/python scripts/app_render_bench.py [--model smollm2-135m] [--columns 3] [--max-new-tokens 64]
        [--stop-after 24] [--repeat 1] [--app-from CHECKOUT ...] [--json]

Starts the app on a free port with a throwaway store, runs a race of the first `--columns` default columns
(plain, prompt lookup, token recycling) from the page's own controls, and reports screen updates per
second, the longest gap between them, the longest browser task (wall clock, and the CPU time Chrome's trace
gives it, which does not grow when other processes hold the cores) and, with `--stop-after N`, a second race (of
8 N tokens) stopped with "Stop all" once N tokens are on screen: the time from the click to the last screen update that
added tokens, and to the status saying done.

`--app-from PATH` (repeatable) measures the app of another checkout of this repository (a `git worktree` of
an older commit, say) with this probe: each checkout's `workbench app` runs in a process of its own, and the
checkouts take turns race by race, so a before/after comparison shares the machine's load. `.` is this one.
The measuring code is `workbench.apps.render_probe`, which the browser tests use too.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

from playwright.sync_api import sync_playwright

from workbench.apps.render_probe import launch_chromium, measure_race

PROMPT = "Write a short story about a fox who learns to count, in plain words."
RANDOM_PROMPT = "5 6 7 8 9 10 5 6 7 8 9 10 5 6"  # random test models take token ids
# Imports `workbench` (and its subpackages, which live in top-level folders) from the checkout given first,
# whatever this environment's editable install points at, then runs its CLI with the remaining arguments.
BOOT = """import importlib.util, sys
root = sys.argv.pop(1)
folders = {"workbench": "workbench", "workbench.apps": "apps", "workbench.kernels": "kernels",
           "workbench.store": "store"}
class Checkout:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in folders:
            where = f"{root}/{folders[name]}"
            return importlib.util.spec_from_file_location(name, f"{where}/__init__.py",
                                                          submodule_search_locations=[where])
sys.meta_path.insert(0, Checkout)
from workbench.cli import main
sys.exit(main(sys.argv[1:]))
"""


@contextmanager
def served(checkout: Path, model: str, store: Path):
    """`workbench app` of `checkout` on a free port, in its own process; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(store.with_suffix(".log"), "w")
    process = subprocess.Popen([sys.executable, "-c", BOOT, str(checkout.resolve()), "app", "--model", model,
                                "--port", str(port), "--store", str(store)], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the app of {checkout} exited: see {log.name}")
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the app of {checkout} did not answer within 300 s") from None
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--columns", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--stop-after", type=int, default=24, help="tokens on screen before Stop all (0: no stop)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--app-from", action="append", type=Path, metavar="CHECKOUT",
                        help="a checkout of this repository whose app to measure (repeatable; default: this one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    prompt = RANDOM_PROMPT if args.model.startswith("random:") else PROMPT
    checkouts = args.app_from or [Path(__file__).resolve().parent.parent]
    reports = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        urls = [stack.enter_context(served(c, args.model, Path(tmp) / f"runs{i}.duckdb"))
                for i, c in enumerate(checkouts)]
        p = stack.enter_context(sync_playwright())
        browser = launch_chromium(p)
        stack.callback(browser.close)
        for _ in range(args.repeat):
            for checkout, url in zip(checkouts, urls):
                page = browser.new_page(viewport={"width": 1400, "height": 1800})
                page.set_default_timeout(600_000)
                reports.append((checkout, "race", measure_race(page, url, args.columns, args.max_new_tokens,
                                                               prompt)))
                print(f"{checkout}: race measured", file=sys.stderr)
                if args.stop_after:  # long enough that only Stop ends it early, short enough to end if it fails
                    reports.append((checkout, "stopped race", measure_race(
                        page, url, args.columns, 8 * args.stop_after, prompt, stop_after_tokens=args.stop_after)))
                    print(f"{checkout}: stopped race measured", file=sys.stderr)
                page.close()
    if args.json:
        print(json.dumps([{"app": str(c), "kind": kind, **r.as_dict()} for c, kind, r in reports], indent=2))
        return
    for checkout, kind, r in reports:
        line = (f"{checkout}: {kind}: {r.columns} x {r.max_new_tokens} tokens in {r.race_ms / 1000:.1f} s; "
                f"{r.updates} screen updates ({r.updates_per_s:.1f}/s), longest gap {r.longest_gap_ms:.0f} ms; "
                f"longest task {r.longest_task_ms:.0f} ms ({r.longest_task_cpu_ms or 0:.0f} ms of CPU), "
                f"{r.long_tasks_ms:.0f} ms in tasks over 50 ms; "
                f"{r.received_kb:.0f} KB received; token text sent as {r.token_appends} appends and "
                f"{r.token_replaces} whole texts; at most {r.max_figures_per_update} figures in one update")
        if r.stop_ms is not None:
            line += f"; Stop all to the last new token {r.stop_ms:.0f} ms, to done {r.stop_done_ms:.0f} ms"
        print(line)


if __name__ == "__main__":
    main()
