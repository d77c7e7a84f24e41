"""Lab 2 in a real browser: JupyterLab (headless, token disabled) on a copy of the solved labs, Debian's Chromium
through Playwright, lab 2's widget cell run on its own; the race's token spans and the plotly figures render."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")
pytest.importorskip("jupyterlab")

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration  # a missing chromium fails the test with the command to install it


@pytest.fixture(scope="module")
def shots():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module("notebook_screenshots")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_lab2_widget_cell_renders_in_jupyterlab(shots, chromium):
    root = shots.solved_copies()
    try:
        with shots.jupyterlab(root) as url:
            page = chromium.new_page(viewport={"width": 1300, "height": 1500})
            page.set_default_timeout(300_000)
            try:
                shots.run_widget_cell(page, url, root)
                spans = page.locator(".wb-text .wb-tok").count()
                accepted = page.locator(".wb-text .wb-tok.wb-accepted").count()
                figures = page.locator(".js-plotly-plot").count()
                (ROOT / "test-artifacts").mkdir(exist_ok=True)
                page.screenshot(path=str(ROOT / "test-artifacts" / "lab02_widgets.png"), full_page=True)
            finally:
                page.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert spans >= 24  # both lanes' 12 tokens
    assert accepted >= 1  # the speculative lane shows accepted drafts
    assert figures >= 1  # the draft tree's plotly figure
