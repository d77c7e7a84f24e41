"""How smoothly a race renders in a real browser: a probe the browser tests and scripts/app_render_bench.py share.

In the page, a PerformanceObserver collects 'longtask' entries (main-thread tasks over 50 ms) and a
MutationObserver counts screen updates: one per observer callback that changed a column's tokens. A race
is started from the page's own controls, so what is measured is what a user's browser does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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
    if (ids.size) probe.updates.push([performance.now(), [...ids]]);
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
    stop_ms: float | None = None  # Stop all click to the last screen update of the tokens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_up(page, url: str, columns: int, max_new_tokens: int, prompt: str | None = None) -> None:
    """Open the app and set the race up through its controls (the columns keep their default specs)."""
    page.goto(url)
    page.wait_for_selector("#wb-generate")
    if prompt is not None:
        page.locator("#wb-prompt textarea").fill(prompt)
    box = page.get_by_label("number input for max new tokens")
    box.fill(str(max_new_tokens))
    box.press("Enter")
    page.locator("#wb-column-count label", has_text=str(columns)).click()
    page.wait_for_function(f"document.querySelectorAll('[id^=\"wb-tokens-\"]').length >= {columns}")


def measure_race(page, url: str, columns: int = 3, max_new_tokens: int = 64, prompt: str | None = None,
                 stop_after_tokens: int | None = None, timeout_ms: int = 600_000) -> RenderReport:
    """Run one race in `page` and report its rendering. With `stop_after_tokens`, click Stop all once that
    many tokens are on screen and report how long the tokens kept changing after the click."""
    set_up(page, url, columns, max_new_tokens, prompt)
    page.evaluate(INSTALL)
    start = page.evaluate("performance.now()")
    page.locator("#wb-generate").click()
    if stop_after_tokens is not None:
        page.wait_for_function(f"window.__wbProbe.tokens() >= {stop_after_tokens}", timeout=timeout_ms)
        page.evaluate("window.__wbProbe.stopAll()")
    page.wait_for_function(DONE, timeout=timeout_ms)
    end = page.evaluate("performance.now()")
    page.wait_for_timeout(1000)  # the final render's tasks and mutations land
    probe = page.evaluate("({longtasks: window.__wbProbe.longtasks, updates: window.__wbProbe.updates,"
                          " clicks: window.__wbProbe.clicks})")
    times = [t for t, _ in probe["updates"] if t >= start]
    tasks = [d for t, d in probe["longtasks"] if t + d >= start]
    gaps = [b - a for a, b in zip(times, times[1:])]
    race_s = (end - start) / 1000
    stop = probe["clicks"].get("stop")
    return RenderReport(
        columns=columns, max_new_tokens=max_new_tokens, race_ms=round(end - start, 1), updates=len(times),
        updates_per_s=round(len(times) / race_s, 2) if race_s > 0 else 0.0,
        longest_gap_ms=round(max(gaps, default=0.0), 1), longest_task_ms=round(max(tasks, default=0.0), 1),
        long_tasks_ms=round(sum(tasks), 1),
        stop_ms=None if stop is None else round(max([t - stop for t in times if t >= stop], default=0.0), 1))
