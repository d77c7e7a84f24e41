"""How smoothly the app renders a race in Debian's headless Chromium (docs/app.md, "Rendering").

    .venv/bin/python scripts/app_render_bench.py [--model smollm2-135m] [--columns 3] [--max-new-tokens 64]
        [--stop-after 24] [--repeat 1] [--json]

Starts the app on a free port with a throwaway store, runs a race of the first `--columns` default columns
(plain, prompt lookup, token recycling) from the page's own controls, and reports screen updates per
second, the longest gap between them, the longest browser task and, with `--stop-after N`, a second race
stopped with "Stop all" once N tokens are on screen: the time from the click to the last screen update that
added tokens, and to the status saying done.
The measuring code is `workbench.apps.render_probe`, which the browser tests use too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from workbench.apps.context import AppContext
from workbench.apps.render_probe import launch_chromium, measure_race
from workbench.apps.server import launched_locally

PROMPT = "Write a short story about a fox who learns to count, in plain words."
RANDOM_PROMPT = "5 6 7 8 9 10 5 6 7 8 9 10 5 6"  # random test models take token ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--columns", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--stop-after", type=int, default=24, help="tokens on screen before Stop all (0: no stop)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    prompt = RANDOM_PROMPT if args.model.startswith("random:") else PROMPT
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        ctx = AppContext.create(args.model, "auto", "cpu", Path(tmp) / "runs.duckdb")
        try:
            with launched_locally(ctx) as (_, url), sync_playwright() as p:
                browser = launch_chromium(p)
                page = browser.new_page(viewport={"width": 1400, "height": 1800})
                page.set_default_timeout(600_000)
                for _ in range(args.repeat):
                    reports.append(("race", measure_race(page, url, args.columns, args.max_new_tokens, prompt)))
                    if args.stop_after:
                        reports.append(("stopped race", measure_race(page, url, args.columns, 1024, prompt,
                                                                     stop_after_tokens=args.stop_after)))
                browser.close()
        finally:
            ctx.close()
    if args.json:
        print(json.dumps([{"kind": kind, **r.as_dict()} for kind, r in reports], indent=2))
        return
    for kind, r in reports:
        line = (f"{kind}: {r.columns} x {r.max_new_tokens} tokens in {r.race_ms / 1000:.1f} s; "
                f"{r.updates} screen updates ({r.updates_per_s:.1f}/s), longest gap {r.longest_gap_ms:.0f} ms; "
                f"longest task {r.longest_task_ms:.0f} ms, {r.long_tasks_ms:.0f} ms in tasks over 50 ms; "
                f"{r.received_kb:.0f} KB received; token text sent as {r.token_appends} appends and "
                f"{r.token_replaces} whole texts; at most {r.max_figures_per_update} figures in one update")
        if r.stop_ms is not None:
            line += f"; Stop all to the last new token {r.stop_ms:.0f} ms, to done {r.stop_done_ms:.0f} ms"
        print(line)


if __name__ == "__main__":
    main()
