"""How smoothly a race renders in a real browser: a probe the browser tests and scripts/app_render_bench.py share.

In the page, a PerformanceObserver collects 'longtask' entries (main-thread tasks over 50 ms) and a
MutationObserver counts screen updates: one per observer callback that changed a column's tokens; Chromium's
DevTools protocol counts the bytes of the server's update stream. A race is started from the page's own
controls, so what is measured is what a user's browser does.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .context import MAX_COLUMNS

INSTALL = """() => {
  const probe = {longtasks: [], updates: [], clicks: {}};
  window.__wbProbe = probe;
  new PerformanceObserver(list => {
    for (const e of list.getEntries()) probe.longtasks.push([e.startTime, e.duration]);
  }).observe({type: 'longtask'});
  const observer = new MutationObserver(records => {
    const ids = new Set();
    for (const r of records) {
      const el = (r.target.nodeType === 1 ? r.target : r.target.parentElement)?.closest('[id^="wb-tokens-"]');
      if (el) ids.add(el.id);
    }
    if (ids.size) probe.updates.push([performance.now(), [...ids], probe.tokens()]);
  });
  for (const el of document.querySelectorAll('[id^="wb-tokens-"]'))
    observer.observe(el, {childList: true, subtree: true, characterData: true, attributes: true});
  probe.stopAll = () => {
    const button = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Stop all');
    probe.clicks.stop = performance.now();
    button.click();
  };
  probe.tokens = () => document.querySelectorAll('[id^="wb-tokens-"] .wb-text .wb-tok:not(.wb-prompt)').length;
}"""

CHROMIUM = "/usr/bin/chromium"  # Debian's: Playwright cannot download its own browser here
INSTALL_CHROMIUM = "apt-get install -y chromium (as root; `make setup` does it when run as root)"


def launch_chromium(playwright):
    """Debian's headless Chromium, or a one-line error saying how to install it (a browser test fails, never
    skips, when it is missing)."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"the browser tests need Debian's chromium at {CHROMIUM}: {INSTALL_CHROMIUM}")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])


# Before the page loads: keep a copy of the server's update stream (Gradio streams each update as edits of the
# outputs' previous values: "append" to a string, "replace", ...), so a race can be checked for what it sent.
TEE = """(() => {
  if (window.__wbTee) return;
  window.__wbTee = [];
  const fetch0 = window.fetch;
  window.fetch = async (...args) => {
    const response = await fetch0(...args);
    if (String(args[0]?.url || args[0]).includes('/queue/data')) {
      const reader = response.clone().body.getReader(), decoder = new TextDecoder();
      (async () => { for (;;) { const {done, value} = await reader.read(); if (done) break;
                                window.__wbTee.push(decoder.decode(value, {stream: true})); } })();
    }
    return response;
  };
})()"""
DONE = "document.querySelector('#wb-status')?.innerText.includes('done:')"


@dataclass
class RenderReport:
    """What one race did in the browser. Times in ms from the Generate click unless said otherwise."""

    columns: int
    max_new_tokens: int
    race_ms: float  # Generate click to the status saying done
    updates: int  # screen updates of the token columns
    updates_per_s: float
    longest_gap_ms: float  # the longest time between two screen updates
    longest_task_ms: float  # the longest browser task (0: none over 50 ms)
    long_tasks_ms: float  # the time spent in tasks over 50 ms, all together
    token_appends: int = 0  # streamed edits of a column's tokens that append to what it shows
    token_replaces: int = 0  # and those that resend the whole text
    max_figures_per_update: int = 0  # the most figures one streamed update redrew
    mixed_updates: int = 0  # streamed updates that redrew a figure and changed token text together
    received_kb: float = 0.0  # what the page received from the server's update stream during the race
    longest_task_cpu_ms: float | None = None  # the most CPU time one browser task took (Chrome's trace; None: not
    # traced). Unlike the wall-clock figures it does not grow when other processes hold the machine's cores
    stop_ms: float | None = None  # Stop all click to the last screen update that changed the number of tokens
    stop_done_ms: float | None = None  # Stop all click to the status saying done (every view drawn)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_up(page, url: str, columns: int, max_new_tokens: int, prompt: str | None = None) -> None:
    """Open the app and set the race up through its controls (the columns keep their default specs)."""
    page.add_init_script(TEE)
    page.goto(url)
    page.wait_for_selector("#wb-generate")
    if prompt is not None:
        page.locator("#wb-prompt textarea").fill(prompt)
    box = page.get_by_label("number input for max new tokens")
    box.fill(str(max_new_tokens))
    box.press("Enter")
    page.locator("#wb-column-count label", has_text=str(columns)).click()
    page.wait_for_function(f"document.querySelectorAll('[id^=\"wb-tokens-\"]').length >= {columns}")


def main_thread_tasks(trace: dict | list) -> list[tuple[float, float]]:
    """(wall ms, CPU ms) of every task of the page's main thread in a Chrome trace (its RunTask events)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    mains = {(e["pid"], e["tid"]) for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and e["args"].get("name") == "CrRendererMain"}
    tasks: dict[tuple, list[tuple[float, float]]] = {m: [] for m in mains}
    for e in events:
        if e.get("name") == "RunTask" and (e.get("pid"), e.get("tid")) in tasks and "dur" in e:
            tasks[(e["pid"], e["tid"])].append((e["dur"] / 1000, e.get("tdur", e["dur"]) / 1000))
    return max(tasks.values(), key=lambda t: sum(w for w, _ in t), default=[])  # the page's renderer is busiest


def measure_race(page, url: str, columns: int = 3, max_new_tokens: int = 64, prompt: str | None = None,
                 stop_after_tokens: int | None = None, timeout_ms: int = 600_000, trace: bool = True
                 ) -> RenderReport:
    """Run one race in `page` and report its rendering. With `stop_after_tokens`, click Stop all once that
    many tokens are on screen and report how long tokens kept appearing after the click. With `trace`, Chrome
    traces the race, for the CPU time of its longest task."""
    set_up(page, url, columns, max_new_tokens, prompt)
    page.evaluate(INSTALL)
    received, streams = [0], set()
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.on("Network.requestWillBeSent",
           lambda e: streams.add(e["requestId"]) if "/queue/data" in e["request"]["url"] else None)
    cdp.on("Network.dataReceived", lambda e: received.__setitem__(0, received[0] + e.get("dataLength", 0))
           if e["requestId"] in streams else None)
    browser = page.context.browser
    with tempfile.TemporaryDirectory() as tmp:
        if trace:
            browser.start_tracing(page=page, path=str(Path(tmp) / "trace.json"), categories=[
                                 "devtools.timeline", "disabled-by-default-devtools.timeline"])
        try:
            report = _race(page, columns, max_new_tokens, stop_after_tokens, timeout_ms, received)
        finally:
            if trace:
                browser.stop_tracing()
        if trace:
            cpu = [c for _, c in main_thread_tasks(json.loads((Path(tmp) / "trace.json").read_text()))]
            report.longest_task_cpu_ms = round(max(cpu, default=0.0), 1)
    cdp.detach()
    return report


def _race(page, columns: int, max_new_tokens: int, stop_after_tokens: int | None, timeout_ms: int,
          received: list[int]) -> RenderReport:
    start = page.evaluate("performance.now()")
    page.locator("#wb-generate").click()
    if stop_after_tokens is not None:
        page.wait_for_function(f"window.__wbProbe.tokens() >= {stop_after_tokens}", timeout=timeout_ms)
        page.evaluate("window.__wbProbe.stopAll()")
    page.wait_for_function(DONE, timeout=timeout_ms)
    end = page.evaluate("performance.now()")
    page.wait_for_timeout(1000)  # the final render's tasks and mutations land
    edits = streamed_edits("".join(page.evaluate("window.__wbTee")))
    probe = page.evaluate("({longtasks: window.__wbProbe.longtasks, updates: window.__wbProbe.updates,"
                          " clicks: window.__wbProbe.clicks})")
    updates = [(t, n) for t, _, n in probe["updates"] if t >= start]
    times = [t for t, _ in updates]
    grew = [t for (t, n), (_, before) in zip(updates, [(start, -1)] + updates) if n != before]
    tasks = [d for t, d in probe["longtasks"] if t + d >= start]
    gaps = [b - a for a, b in zip(times, times[1:])]
    race_s = (end - start) / 1000
    stop = probe["clicks"].get("stop")
    return RenderReport(
        columns=columns, max_new_tokens=max_new_tokens, race_ms=round(end - start, 1), updates=len(times),
        updates_per_s=round(len(times) / race_s, 2) if race_s > 0 else 0.0,
        longest_gap_ms=round(max(gaps, default=0.0), 1), longest_task_ms=round(max(tasks, default=0.0), 1),
        long_tasks_ms=round(sum(tasks), 1), received_kb=round(received[0] / 1024, 1), **edits,
        stop_ms=None if stop is None else round(max([t - stop for t in grew if t >= stop], default=0.0), 1),
        stop_done_ms=None if stop is None else round(end - stop, 1))


def streamed_edits(stream: str) -> dict[str, int]:
    """Count, in the intermediate updates of Gradio's stream (`process_generating`), the edits of token text
    (the columns' outputs come first: html, stats and links of each) by kind, the most figures (Plotly values)
    one update changed, and the updates that changed both."""
    out = {"token_appends": 0, "token_replaces": 0, "max_figures_per_update": 0, "mixed_updates": 0}
    for line in stream.splitlines():
        if not line.startswith("data:"):
            continue
        message = json.loads(line[5:])
        if message.get("msg") != "process_generating":
            continue
        figures = tokens = 0
        for i, edits in enumerate(message.get("output", {}).get("data") or []):
            for op, path, value in edits if isinstance(edits, list) else []:
                if i < 3 * MAX_COLUMNS and isinstance(value, str) and "wb-tok" in value and not path:
                    out["token_appends" if op == "append" else "token_replaces"] += 1
                    tokens += 1
                if "plot" in path or (isinstance(value, dict) and value.get("type") == "plotly"):
                    figures += 1
        out["max_figures_per_update"] = max(out["max_figures_per_update"], figures)
        out["mixed_updates"] += bool(figures and tokens)
    return out
