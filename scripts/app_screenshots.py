"""Screenshots of each tab of the app for docs/app.md (docs/images/app_*.png).

    .venv/bin/python scripts/app_screenshots.py [--model smollm2-135m] [--out docs/images]

Starts the app on a free port with a throwaway store, runs plain decoding beside prompt lookup and token
recycling, then photographs the Generate, Runs and SQL tabs in Debian's headless Chromium; then the same race in
the dark theme (app_generate_dark.png) and on a 390 px wide phone screen (app_narrow.png).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from workbench.apps.context import AppContext
from workbench.apps.render_probe import launch_chromium
from workbench.apps.runs_tab import COLUMNS as RUN_COLUMNS
from workbench.apps.server import launched_locally

PROMPT = ("Repeat this list exactly: apples, pears, plums, cherries, apricots. "
          "Then repeat it once more: apples, pears, plums, cherries, apricots.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "images"))
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = AppContext.create(args.model, "auto", "cpu", Path(tmp) / "runs.duckdb")
        try:
            with launched_locally(ctx) as (_, url):
                shoot(url, out, args.max_new_tokens)
        finally:
            ctx.close()


def race(page, url: str, max_new_tokens: int) -> None:
    """Three columns (plain, prompt lookup, token recycling) on PROMPT, run from the page's controls."""
    page.goto(url)
    page.locator("#wb-prompt textarea").fill(PROMPT)
    box = page.get_by_label("number input for max new tokens")
    box.fill(str(max_new_tokens))
    box.press("Enter")
    page.locator("#wb-column-count label", has_text="3").click()
    page.locator("#wb-generate").click()
    page.wait_for_function("document.querySelector('#wb-status')?.innerText.includes('done:')")
    page.locator("#wb-view-column label", has_text="3").click()  # token recycling's trees
    page.wait_for_timeout(1500)


def shoot(url: str, out: Path, max_new_tokens: int) -> None:
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        race(page, url, max_new_tokens)
        page.screenshot(path=str(out / "app_generate.png"), full_page=True)

        page.get_by_role("tab", name="Runs").click()
        page.wait_for_function("document.querySelector('#wb-runs-message')?.innerText.includes('runs shown')")
        for row in range(3):  # the first cell of each of the three runs selects it for comparison
            page.locator("#wb-runs-table [role=gridcell]").nth(row * len(RUN_COLUMNS)).click()
            page.wait_for_timeout(600)
        page.wait_for_function("document.querySelector('#wb-runs-compared')?.innerText.includes('comparing')")
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "app_runs.png"), full_page=True)

        page.get_by_role("tab", name="SQL").click()
        page.locator("#wb-sql textarea").fill("SELECT depth, avg(accepted::INT) AS acceptance, count(*) AS nodes\n"
                                              "FROM draft_nodes GROUP BY depth ORDER BY depth")
        page.locator("#wb-sql-run").click()
        page.wait_for_function("document.querySelector('#wb-sql-message')?.innerText.includes('rows')")
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "app_sql.png"), full_page=True)

        race(page, url + "?__theme=dark", max_new_tokens)
        page.screenshot(path=str(out / "app_generate_dark.png"), full_page=True)
        phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
        phone.set_default_timeout(120_000)
        race(phone, url, max_new_tokens)
        phone.set_viewport_size({"width": 390, "height": 1300})  # a tall phone: the three raced columns
        phone.locator("#wb-tokens-1").evaluate("el => el.scrollIntoView()")
        phone.wait_for_timeout(500)
        phone.screenshot(path=str(out / "app_narrow.png"))
        browser.close()
    names = ("generate", "runs", "sql", "generate_dark", "narrow")
    print(f"wrote {', '.join(f'app_{t}.png' for t in names)} to {out}")


if __name__ == "__main__":
    main()
