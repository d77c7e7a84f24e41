"""The widgets drawn by JupyterLab in a real browser: a JupyterLab server on a temporary folder, Debian's
headless Chromium (Playwright) running a notebook that races two configurations on a tiny random model and
shows a draft tree. Every request the page makes outside the local server is refused and recorded: the
widgets' JavaScript must all come from the installed packages (no CDN)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("jupyterlab")

pytestmark = pytest.mark.integration  # a missing chromium fails the tests with the command to install it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
jupyterlab = importlib.import_module("notebook_screenshots").jupyterlab  # the labs' screenshots start it the same way
sys.path.pop(0)
CELLS = [
    "from workbench.api import Workbench\nfrom workbench.widgets import DraftTreeView, Race\n"
    "wb = Workbench('random:llama')\n"
    "race = Race('5 6 7 8 9 10 5 6 7 8 9 10 5 6', ['decode=plain', 'decode=prompt_lookup'], wb=wb,"
    " max_new_tokens=12)\nrace",
    "race.wait()\nDraftTreeView(race.traces[1], wb)",
]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    kernel = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}  # no dialog
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS], metadata=kernel)
    nbformat.write(notebook, root / "race.ipynb")
    with jupyterlab(root) as url:
        yield url


def test_race_and_draft_tree_render_in_jupyterlab(lab, chromium):
    outside: list[str] = []
    page = chromium.new_page(viewport={"width": 1400, "height": 1600})
    page.set_default_timeout(120_000)

    def route(r):
        if r.request.url.startswith(lab):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    try:
        page.goto(f"{lab}/lab/tree/race.ipynb")
        page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook')")
        page.wait_for_function("""async () => {  // the kernel started and connected: run-all is not lost
            const panel = window.jupyterapp.shell.currentWidget;
            await panel.sessionContext.ready;
            return panel.sessionContext.session?.kernel?.connectionStatus === 'connected'
                && panel.sessionContext.session.kernel.status === 'idle';
        }""")
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")  # not awaited
        # both columns' token streams (anywidget) fill with 12 tokens each; the plotly FigureWidgets draw
        page.wait_for_function("document.querySelectorAll('.wb-text .wb-tok').length >= 24")
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 2")
        page.wait_for_function("document.body.textContent.includes('draft tree, step')")
        spans = page.locator(".wb-text .wb-tok").count()
        Path("test-artifacts").mkdir(exist_ok=True)
        page.screenshot(path="test-artifacts/widgets_jupyterlab.png", full_page=True)
    finally:
        page.close()
    assert spans >= 24
    assert outside == [], f"the page asked for something outside the local server: {outside[:5]}"
