"""The app in a real browser: Playwright drives Debian's headless Chromium against a live server with the
embedded model. One side-by-side generation of two configurations, its views, then a run permalink.

The screenshots are kept as test artifacts in test-artifacts/ (ignored by git)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("playwright.sync_api")

from workbench.apps.context import AppContext  # noqa: E402
from workbench.apps.server import launched_locally  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
pytestmark = pytest.mark.integration  # a missing chromium fails the tests with the command to install it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ctx = AppContext.create("smollm2-135m", "auto", "cpu", tmp_path_factory.mktemp("browser") / "runs.duckdb")
    try:
        with launched_locally(ctx) as (_, url):
            yield url
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def page(chromium):
    page = chromium.new_page(viewport={"width": 1400, "height": 1800})
    page.set_default_timeout(60_000)
    yield page
    page.close()


def plot_rendered(page, elem_id: str) -> bool:
    return page.locator(f"#{elem_id} .js-plotly-plot").count() > 0


def test_side_by_side_views_and_permalink(server, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(server)
    page.locator("#wb-prompt textarea").fill("Repeat exactly: the cat sat on the mat. The cat sat on the mat.")
    page.get_by_label("number input for max new tokens").fill("12")
    page.get_by_label("number input for max new tokens").press("Enter")
    page.locator("#wb-generate").click()
    page.wait_for_function("document.querySelector('#wb-status')?.innerText.includes('done:')", timeout=120_000)
    status = page.locator("#wb-status").inner_text()
    assert "2 of 2 configurations ran" in status

    for column in (1, 2):  # tokens coloured by source, with a hover per token, and live stats
        tokens = page.locator(f"#wb-tokens-{column} .wb-text .wb-tok.wb-bonus")
        assert tokens.count() >= 1
        assert "logprob" in tokens.first.get_attribute("title")
        assert "tok/s" in page.locator(f"#wb-stats-{column}").inner_text()

    page.locator("#wb-view-column label", has_text="2").click()  # the views show configuration 2 (prompt lookup)
    for elem_id in ("wb-tree", "wb-acceptance", "wb-lengths", "wb-timeline", "wb-kv"):
        page.wait_for_selector(f"#{elem_id} .js-plotly-plot")
        assert plot_rendered(page, elem_id), elem_id
    assert "draft tree" in page.locator("#wb-tree").inner_text()
    assert "KV" in page.locator("#wb-kv").inner_text()
    assert "positions kept" in page.locator("#wb-kept").inner_text()
    page.screenshot(path=str(ARTIFACTS / "app_generate.png"), full_page=True)

    href = page.locator("#wb-links-2 a", has_text="run link").get_attribute("href")
    run_id = re.search(r"run=([0-9a-f]+)", href).group(1)
    page.goto(server + "?run=" + run_id)
    page.wait_for_function("document.querySelector('#wb-status')?.innerText.includes('opened run')")
    assert run_id in page.locator("#wb-status").inner_text()
    assert page.locator("#wb-tokens-1 .wb-text .wb-tok.wb-bonus").count() >= 1
    page.wait_for_selector("#wb-tree .js-plotly-plot")
    page.screenshot(path=str(ARTIFACTS / "app_permalink.png"), full_page=True)
